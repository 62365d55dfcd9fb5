"""Learning from the mailbox: the Dovecot IMAPSieve set-up of docs/learning.md, as written
there, with a private Dovecot and a real redis-server on loopback.  Moving a message into
Junk over IMAP learns it as spam, moving it out as ham, and Junk emptied into Trash is not
learned."""

from __future__ import annotations

import os
import re
import sys
import uuid

import pytest

from support import REPO_ROOT, wait_until
from support.dovecot import DovecotServer, dovecot_available
from support.redis_fixtures import master  # noqa: F401  (fixture)

# Where docs/learning.md puts each file, and where the test puts it in Dovecot's work directory.
PLACES = {"/etc/dovecot/sieve": "sieve", "/usr/local/lib/milterguard/sieve-pipe": "sieve-pipe",
          "/etc/milterguard/learn": "learn-etc"}
_FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
_NAME = re.compile(r"^# (/\S+)", re.M)


def documented_files() -> dict[str, str]:
    """The code blocks of docs/learning.md that name their file in a first comment line."""
    text = (REPO_ROOT / "docs" / "learning.md").read_text()
    files = {}
    for block in _FENCE.findall(text):
        lines = block.splitlines()
        head = lines[1] if lines and lines[0].startswith("#!") and len(lines) > 1 else (lines[0] if lines else "")
        match = _NAME.match(head)
        if match:
            files[match.group(1)] = block
    return files


@pytest.fixture
def dovecot(tmp_path, master):  # noqa: F811  (the master fixture)
    reason = dovecot_available()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path / "dovecot"
    docs = documented_files()
    netlog = workdir / "net.log"  # the loopback guard's report, writable by the mail user
    # The documented program, run by this checkout's milterguard with the guard, in a clean environment.
    command = (f"exec env -i PYTHONPATH={REPO_ROOT}:{REPO_ROOT / 'tests' / 'support' / 'netguard'} "
               f"MILTERGUARD_TEST_NETLOG={netlog} {sys.executable} -m milterguard ")

    def placed(text: str) -> str:
        for doc_path, place in PLACES.items():
            text = text.replace(doc_path, f"{workdir}/{place}")
        return text.replace("exec /usr/bin/milterguard ", command)

    files = {}
    conf = ""
    for path, text in docs.items():
        if path.startswith("/etc/dovecot/conf.d/"):
            conf += placed(text)
        elif path.startswith("/etc/milterguard/learn/"):
            files[placed(path)[len(str(workdir)) + 1:]] = re.sub(r"url: \S+", f"url: {master.url}", text)
        else:
            files[placed(path)[len(str(workdir)) + 1:]] = placed(text)
    assert sorted(files) == ["learn-etc/local.d/redis.yaml", "sieve-pipe/learn-ham", "sieve-pipe/learn-spam",
                             "sieve/learn-ham.sieve", "sieve/learn-spam.sieve"] and "imapsieve_mailbox2_from" in conf
    workdir.mkdir(parents=True)
    netlog.touch()
    netlog.chmod(0o666)
    server = DovecotServer.start(workdir, extra_conf=conf, files=files)
    try:
        for name in ("sieve/learn-spam.sieve", "sieve/learn-ham.sieve"):
            server.compile_sieve(name)
        yield server
    finally:
        server.stop()
        report = netlog.read_text()
        assert not report, "traffic beyond loopback:\n" + report


def totals(master) -> tuple[int, int]:  # noqa: F811
    """Spam and ham learned, as `milterguard bayes stats` counts them."""
    spam, ham = master.client().hmget("mg:bayes:totals", "spam", "ham")
    return int(spam or 0), int(ham or 0)


def mail(subject: str) -> bytes:
    return (f"From: Shop <offers@shop.example.com>\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
            f"Date: Mon, 02 Jan 2023 10:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@shop.example.com>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{subject}: the offer of the week, {uuid.uuid4().hex}.\r\n").encode()


def move(imap, source: str, target: str, raw: bytes) -> None:
    """APPEND RAW to SOURCE (no learning: the scripts run on COPY), then MOVE it to TARGET."""
    assert imap.append(source, None, None, raw)[0] == "OK"
    assert imap.select(source)[0] == "OK"
    typ, data = imap.uid("SEARCH", None, "ALL")
    assert typ == "OK"
    uid = data[0].split()[-1].decode()
    typ, data = imap.uid("MOVE", uid, target)
    assert typ == "OK", data


def test_moving_into_junk_learns_spam_and_out_of_it_ham(dovecot, master):  # noqa: F811
    imap = dovecot.imap()
    try:
        assert totals(master) == (0, 0)
        move(imap, "INBOX", "Junk", mail("Cheap watches"))
        wait_until(lambda: totals(master) == (1, 0) or None, 30, what="one spam learned",
                   on_timeout=dovecot.log)
        move(imap, "Junk", "INBOX", mail("Minutes of the meeting"))
        wait_until(lambda: totals(master) == (1, 1) or None, 30, what="one ham learned",
                   on_timeout=dovecot.log)
        move(imap, "Junk", "Trash", mail("Old spam"))
        # The scripts run during the MOVE command, one after the other: had the move to Trash
        # been learned, it would be counted before the next one.
        move(imap, "Junk", "INBOX", mail("The report you asked for"))
        wait_until(lambda: totals(master) == (1, 2) or None, 30, what="the second ham learned",
                   on_timeout=dovecot.log)
    finally:
        imap.logout()
