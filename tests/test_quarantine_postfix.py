"""The quarantine end to end: Postfix -> milterguard -> the store, and releases
through a second Postfix (the re-injection service that bypasses the filter)
to the sink.  All real, on loopback."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from milterguard.cli import main
from support import wait_until
from support.quarantine import RCPTS, SENDER, held_message, listed, message

pytestmark = pytest.mark.postfix

@pytest.fixture
def reinject(postfix_factory):
    """The re-injection service: a Postfix without milters, relaying to the sink."""
    return postfix_factory(None, name="reinject")


@pytest.fixture
def cli(milterguard, reinject, capsys):
    """`milterguard quarantine ARGS...` with the filter's configuration: (status, stdout)."""

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        status = main(["quarantine", *args, "--etc-dir", str(milterguard.etc_dir),
                       "--set", f"quarantine.url={milterguard.sets['quarantine.url']}",
                       "--set", f"quarantine.reinject=127.0.0.1:{reinject.smtpd_port}"])
        return status, capsys.readouterr().out

    return run


def test_review_is_stored_not_delivered_and_released_once(postfix, milterguard, sink, cli, reinject):
    record, msgid = held_message(postfix, milterguard, cli)
    assert postfix.queue() == []  # discarded at the door: the MTA never delivers it
    assert record["from"] == SENDER and record["rcpts"] == RCPTS
    assert "CANARY_REVIEW" in [s["name"] for s in record["symbols"]]
    assert {"id", "time", "from", "rcpts", "subject", "score", "symbols"} <= set(record)
    assert [r["id"] for r in listed(cli, "--rcpt", "carol@example.org", "--symbol", "CANARY_REVIEW")] == [record["id"]]
    assert not any(m.message_id == msgid for m in sink.messages)

    status, out = cli("release", record["id"], "--by", "postmaster")
    assert status == 0, out
    got = sink.wait_for_message_id(msgid)
    assert got.mail_from == SENDER and sorted(got.rcpt_tos) == RCPTS
    released = got.header("X-Milterguard-Released")
    assert released.startswith("by postmaster at") and record["id"] in released
    assert got.header("X-Spam-Flag") == "YES" and got.header("Subject") == "[SPAM] held for review"

    status, _out = cli("release", record["id"])
    assert status == 1  # a second release needs --force
    assert cli("show", record["id"], "--json")[1].count('"kind":"release"') == 1
    # The re-injection Postfix has nothing left to send, and the sink got it once.
    wait_until(lambda: reinject.queue() == [] or None, 10, what="an empty re-injection queue")
    assert [m.message_id for m in sink.messages].count(msgid) == 1


def test_release_to_one_recipient_then_force(postfix, milterguard, sink, cli):
    record, msgid = held_message(postfix, milterguard, cli)
    assert cli("release", record["id"], "--rcpt", "carol@example.org")[0] == 0
    got = sink.wait_for_message_id(msgid)
    assert got.rcpt_tos == ["carol@example.org"]
    assert cli("release", record["id"], "--rcpt", "carol@example.org")[0] == 1
    assert cli("release", record["id"], "--rcpt", "bob@example.net", "--json")[0] == 0
    wait_until(lambda: len([m for m in sink.messages if m.message_id == msgid]) == 2 or None, 10,
               what="the release to bob")
    assert cli("release", record["id"], "--force")[0] == 0
    wait_until(lambda: len([m for m in sink.messages if m.message_id == msgid]) == 3 or None, 10,
               what="the forced release")


def test_show_explain_prints_the_stored_verdict(postfix, milterguard, cli):
    record, _msgid = held_message(postfix, milterguard, cli)
    status, out = cli("show", record["id"], "--explain")
    assert status == 0 and "CANARY_REVIEW" in out and "-> review" in out
    status, raw = cli("show", record["id"], "--raw")
    assert "MILTERGUARD-CANARY-REVIEW" in raw and "X-Spam-Flag: YES" in raw
    assert cli("delete", record["id"])[0] == 0
    assert listed(cli) == []
    assert json.loads(cli("stats", "--json")[1])["messages"] == 0


def test_a_store_that_fails_gets_451_and_the_retry_is_stored(postfix, milterguard, cli, sink):
    # Open the store once, then put a file where its directory was: every write fails.
    held_message(postfix, milterguard, cli)
    directory = milterguard.workdir / "quarantine"
    os.rename(directory, milterguard.workdir / "quarantine.away")
    directory.write_text("not a directory\n")
    raw, msgid = message("MILTERGUARD-CANARY-REVIEW", subject="retried")
    result = postfix.send(raw, SENDER, RCPTS)
    assert result.code == 451, result
    line = wait_until(lambda: next((l for l in milterguard.log_text().splitlines() if "failed in the quarantine store" in l),
                                   None), 10, what="the store failure line", on_timeout=milterguard.log_tail)
    assert "on_error=tempfail" in line
    directory.unlink()
    os.rename(milterguard.workdir / "quarantine.away", directory)
    assert postfix.send(raw, SENDER, RCPTS).code == 250  # the sender's retry
    assert [r["subject"] for r in listed(cli, "--symbol", "CANARY_REVIEW")].count("retried") == 1
    assert not any(m.message_id == msgid for m in sink.messages)


def test_reviews_stored_at_once_are_all_kept_and_no_worker_dies(postfix, milterguard, cli):
    # Eight sessions at a time storing: SQLAlchemy's Python functions on each SQLite
    # connection crashed the workers when the connections closed (SIGSEGV, SIGBUS).
    messages = [message("MILTERGUARD-CANARY-REVIEW", subject=f"parallel {i}")[0] for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        codes = [result.code for result in pool.map(lambda raw: postfix.send(raw, SENDER, RCPTS), messages)]
    assert codes == [250] * 24
    wait_until(lambda: len(listed(cli, "--symbol", "CANARY_REVIEW")) == 24 or None, 20, what="24 stored messages",
               on_timeout=milterguard.log_tail)
    assert "died" not in milterguard.log_text()


@pytest.fixture
def small_disk(tmp_path):
    """A file system of 1 MiB (tmpfs) for the store, grown with `grow()`; unmounted at the end."""
    import subprocess

    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mountpoint)], check=True)

    try:
        yield mountpoint, grow
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_gets_451_and_the_retry_is_stored_once_there_is_room(small_disk, milterguard_factory,
                                                                          postfix_factory, capsys):
    mountpoint, grow = small_disk
    url = f"sqlite:///{mountpoint}/quarantine.db"
    mg = milterguard_factory(sets={"quarantine.url": url}, workers=1)
    pf = postfix_factory(mg.socket)
    # Two megabytes of text: more than the whole file system holds.
    raw, msgid = message("MILTERGUARD-CANARY-REVIEW\r\n" + ("filler text for the quarantine " * 64 + "\r\n") * 1000,
                         subject="no room")
    result = pf.send(raw, SENDER, RCPTS)
    assert result.code == 451, result
    line = wait_until(lambda: next((l for l in mg.log_text().splitlines() if "failed in the quarantine store" in l),
                                   None), 10, what="the store failure line", on_timeout=mg.log_tail)
    assert "full" in line and "on_error=tempfail" in line
    assert sum("failed in the quarantine store" in l for l in mg.log_text().splitlines()) == 1
    grow()
    assert pf.send(raw, SENDER, RCPTS).code == 250  # the sender's retry
    capsys.readouterr()
    assert main(["quarantine", "list", "--json", "--etc-dir", str(mg.etc_dir), "--set", f"quarantine.url={url}"]) == 0
    stored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["subject"] for r in stored] == ["no room"]
