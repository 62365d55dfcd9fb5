"""Virus scanning with a real clamd on loopback (signatures made by the tests).

The engine-level tests feed messages to `Engine.evaluate`; the end-to-end
ones go through a private Postfix and `milterguard serve`.
"""

from __future__ import annotations

import base64
import logging
import socket
import time
import uuid

import pytest

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Action, Connection, Transaction
from milterguard.mail.raw import split_message
from support import LOOPBACK, free_port
from support.clamd import BODY_SIGNATURE_NAME, BODY_SIGNATURE_TEXT, EICAR, EICAR_NAME, ClamdInstance, clamd_available


@pytest.fixture
def clamd(tmp_path):
    reason = clamd_available()
    if reason:
        pytest.skip(reason)
    with ClamdInstance(tmp_path / "clamd") as instance:
        yield instance


def mail(body_part: str = "", attachment: bytes | None = None, name: str = "readme.txt") -> tuple[bytes, str]:
    msgid = f"{uuid.uuid4().hex}@example.com"
    head = (
        "From: Alice Example <alice@example.com>\r\n"
        "To: Bob Example <bob@example.net>\r\n"
        "Subject: the file you asked for\r\n"
        "Date: Mon, 02 Jan 2023 10:00:00 +0000\r\n"
        f"Message-ID: <{msgid}>\r\n"
        "MIME-Version: 1.0\r\n"
    )
    if attachment is None:
        return (head + "Content-Type: text/plain\r\n\r\n" + (body_part or "Hello Bob.") + "\r\n").encode(), f"<{msgid}>"
    encoded = base64.encodebytes(attachment).decode().replace("\n", "\r\n")
    text = (
        head + 'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nHere it is, as promised.\r\n"
        f'--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="{name}"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}--b1--\r\n"
    )
    return text.encode(), f"<{msgid}>"


def evaluate(tmp_path, raw: bytes, **sets):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    config = load_config(etc_dir=etc, sets=[f"{k}={v}" for k, v in sets.items()])
    engine = Engine.load(config, strict=True)
    headers, body = split_message(raw)
    txn = Transaction(mail_from="alice@example.com", rcpts=["bob@example.net"], headers=headers, body=body,
                      body_size=len(body))
    return engine.evaluate(Connection(client_ip="198.51.100.7", client_name="mx.example.com"), txn)


def test_eicar_attachment_is_a_virus_with_its_name(tmp_path, clamd):
    raw, _ = mail(attachment=EICAR, name="eicar.com")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": clamd.address})
    hit = verdict.hit("CLAMAV_VIRUS")
    assert hit is not None and hit.options[0].startswith(EICAR_NAME)
    assert verdict.action == Action.REJECT and verdict.reason == "CLAMAV_VIRUS"


def test_body_signature_of_our_own(tmp_path, clamd):
    raw, _ = mail(f"please run this: {BODY_SIGNATURE_TEXT}")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": clamd.address})
    assert verdict.hit("CLAMAV_VIRUS").options[0].startswith(BODY_SIGNATURE_NAME)


def test_attachments_mode_scans_decoded_parts(tmp_path, clamd):
    raw, _ = mail(attachment=EICAR, name="eicar.com")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": clamd.address, "clamav.scan": "attachments"})
    assert verdict.hit("CLAMAV_VIRUS").options[0].startswith(EICAR_NAME)
    # In attachments mode the text part is not sent, so the body signature is not seen.
    raw, _ = mail(f"text only {BODY_SIGNATURE_TEXT}")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": clamd.address, "clamav.scan": "attachments"})
    assert "CLAMAV_VIRUS" not in verdict.symbols


def test_clean_message_has_no_clamav_symbol(tmp_path, clamd):
    raw, _ = mail(attachment=b"just some bytes\n" * 100, name="notes.txt")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": clamd.address})
    assert not [s for s in verdict.symbols if s.startswith("CLAMAV_")]


def test_virus_can_be_held_for_review_instead(tmp_path, clamd):
    raw, _ = mail(attachment=EICAR, name="eicar.com")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": clamd.address, "symbols.CLAMAV_VIRUS.action": "review"})
    assert verdict.action == Action.REVIEW and verdict.reason == "CLAMAV_VIRUS"


def test_over_size_limit_is_not_scanned(tmp_path, clamd):
    raw, _ = mail(attachment=EICAR + b"x" * 4000, name="big.bin")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": clamd.address, "clamav.max_size": "2K"})
    assert "CLAMAV_TOO_LARGE" in verdict.symbols and "CLAMAV_VIRUS" not in verdict.symbols


def test_clamd_limit_smaller_than_ours_is_reported(tmp_path):
    if clamd_available():
        pytest.skip(clamd_available())
    with ClamdInstance(tmp_path / "clamd", stream_max_length="1K") as small:
        raw, _ = mail(attachment=b"y" * 8000, name="big.bin")
        verdict = evaluate(tmp_path, raw, **{"clamav.address": small.address})
    assert "CLAMAV_TOO_LARGE" in verdict.symbols


def test_no_clamd_listening_fails_open(tmp_path):
    raw, _ = mail(attachment=EICAR, name="eicar.com")
    verdict = evaluate(tmp_path, raw, **{"clamav.address": f"{LOOPBACK}:{free_port()}"})
    assert verdict.hit("CLAMAV_TEMPFAIL").options == ["unavailable"]
    assert verdict.action != Action.REJECT


def test_off_when_no_address(tmp_path):
    raw, _ = mail(attachment=EICAR, name="eicar.com")
    verdict = evaluate(tmp_path, raw)
    assert not [s for s in verdict.symbols if s.startswith("CLAMAV_")]


def test_server_that_never_answers_is_cut_at_the_timeout(tmp_path):
    # hanging_clamd: a listening socket that accepts (through the kernel backlog) and never reads.
    with socket.socket() as hanging_clamd:
        hanging_clamd.bind((LOOPBACK, 0))
        hanging_clamd.listen(8)
        raw, _ = mail("hello")
        t0 = time.monotonic()
        verdict = evaluate(tmp_path, raw, **{"clamav.address": f"{LOOPBACK}:{hanging_clamd.getsockname()[1]}",
                                             "clamav.timeout": 0.5})
        elapsed = time.monotonic() - t0
    assert verdict.hit("CLAMAV_TEMPFAIL").options == ["timeout"]
    assert elapsed < 3.0


def test_waiting_for_a_frozen_clamd_is_not_a_slow_check(tmp_path, caplog):
    # Issue 11 (the fault campaign): with clamd frozen, each message in flight logged
    # "check clamav took 2.00s" beside clamd's own outage line.  The wait is clamav.timeout's
    # to bound and CLAMAV_TEMPFAIL's to report, as DNS waits are the DNS budget's.
    with socket.socket() as hanging_clamd, caplog.at_level(logging.WARNING, logger="milterguard"):
        hanging_clamd.bind((LOOPBACK, 0))
        hanging_clamd.listen(8)
        verdict = evaluate(tmp_path, mail("hello")[0], **{
            "clamav.address": f"{LOOPBACK}:{hanging_clamd.getsockname()[1]}", "clamav.timeout": 0.5,
            "checks.check_budget": 0.2})
    assert "CLAMAV_TEMPFAIL" in verdict.symbols and "CHECK_SLOW" not in verdict.symbols
    assert not [r for r in caplog.records if "took" in r.getMessage()], caplog.text


# ------------------------------------------------------------------ through Postfix


@pytest.mark.postfix
def test_virus_rejected_through_postfix_with_signature_logged(postfix_factory, milterguard_factory, sink, clamd):
    mg = milterguard_factory(workers=1, sets={"clamav.address": clamd.address})
    pf = postfix_factory(mg)
    raw, msgid = mail(attachment=EICAR, name="eicar.com")
    result = pf.send(raw)
    assert result.code == 550
    verdict = mg.verdict_for(msgid)
    assert verdict.action == "reject" and verdict.has("CLAMAV_VIRUS")
    # One log line names the signature and the queue id of the rejected message.
    assert f"clamd found {EICAR_NAME}.UNOFFICIAL in message of {verdict['queue_id']}" in mg.log_text()
    assert not any(m.message_id == msgid for m in sink.messages)


@pytest.mark.postfix
def test_clamd_stopped_mail_flows_with_tempfail(postfix_factory, milterguard_factory, sink, clamd):
    mg = milterguard_factory(workers=1, sets={"clamav.address": clamd.address})
    pf = postfix_factory(mg)
    clamd.stop()
    raw, msgid = mail("a clean note MILTERGUARD-CANARY-CLEAN")
    assert pf.send(raw).code == 250
    sink.wait_for_message_id(msgid)
    verdict = mg.verdict_for(msgid)
    assert verdict.has("CLAMAV_TEMPFAIL") and verdict.applied == "accept"


@pytest.mark.postfix
def test_paused_clamd_budget_holds(postfix_factory, milterguard_factory, sink, clamd):
    mg = milterguard_factory(workers=1, sets={"clamav.address": clamd.address, "clamav.timeout": 1.0})
    pf = postfix_factory(mg)
    clamd.pause()
    raw, msgid = mail("a clean note MILTERGUARD-CANARY-CLEAN")
    t0 = time.monotonic()
    assert pf.send(raw).code == 250
    elapsed = time.monotonic() - t0
    sink.wait_for_message_id(msgid)
    verdict = mg.verdict_for(msgid)
    assert verdict.has("CLAMAV_TEMPFAIL")
    assert elapsed < 5.0, f"the session took {elapsed:.1f}s"


LAZY_IMPORT = r"""
import sys, tempfile
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Connection, Transaction
from milterguard.mail.raw import split_message

headers, body = split_message(b"From: a@example.com\nTo: b@example.net\nSubject: hi\n\nHello.\n")
config = load_config(etc_dir=tempfile.mkdtemp(), sets=sys.argv[1:])
verdict = Engine.load(config).evaluate(Connection(client_ip="198.51.100.7"),
                                       Transaction(mail_from="a@example.com", rcpts=["b@example.net"], headers=headers,
                                                   body=body, body_size=len(body)))
print(" ".join(verdict.symbols), "clamd" in sys.modules, "pkg_resources" in sys.modules)
"""


def test_scanning_needs_neither_the_clamd_library_nor_pkg_resources():
    """The client speaks INSTREAM itself: `import clamd` pulled in pkg_resources
    (about 10 MB resident and 85 ms at start-up)."""
    import subprocess
    import sys

    def run(*sets):
        out = subprocess.run([sys.executable, "-c", LAZY_IMPORT, *sets], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run()[-2:] == ["False", "False"]
    port = free_port()  # nothing listens there: clamd is down
    symbols = run(f"clamav.address={LOOPBACK}:{port}", "clamav.timeout=0.5")
    assert "CLAMAV_TEMPFAIL" in symbols and symbols[-2:] == ["False", "False"]
