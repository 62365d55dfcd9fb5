"""The test infrastructure itself, proven with the no-op milter.

Postfix -> no-op pymilter milter -> SMTP sink, all real, on loopback.
If these fail, every end-to-end milterguard test would fail for reasons
that have nothing to do with milterguard.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from support import run_miltertest
from support.milterguard_proc import parse_verdicts


def message(subject: str = "infrastructure check", *, body: bytes | None = None) -> tuple[bytes, str]:
    """A message with awkward but valid content; returns (bytes, Message-ID)."""
    msgid = f"<{uuid.uuid4().hex}@example.com>"
    if body is None:
        body = (
            "Grüße aus Köln — 8bit UTF-8 body.\r\n"
            ".a line that starts with a dot\r\n"
            "..and one with two\r\n"
            ".\r\n"
            "\r\n"
            "trailing spaces   \r\n"
            + "x" * 900 + "\r\n"
            "last line\r\n"
        ).encode("utf-8")
    head = (
        "From: Alice Example <alice@example.com>\r\n"
        "To: Bob Example <bob@example.net>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 02 Jan 2023 10:00:00 +0000\r\n"
        f"Message-ID: {msgid}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "X-Folded: first part\r\n"
        "\tsecond part\r\n"
        "\r\n"
    ).encode("ascii")
    return head + body, msgid


def strip_first_received(data: bytes) -> bytes:
    """Remove the Received: field Postfix prepends (with its folded lines)."""
    assert data.startswith(b"Received: "), data[:200]
    lines = data.split(b"\r\n")
    i = 1
    while lines[i].startswith((b" ", b"\t")):
        i += 1
    return b"\r\n".join(lines[i:])


@pytest.mark.postfix
def test_message_passes_through_noop_milter_intact(postfix_factory, noop_milter, sink):
    pf = postfix_factory(noop_milter.socket)
    data, msgid = message()

    result = pf.send(data, "alice@example.com", ["bob@example.net", "carol@example.net"])

    assert result.code == 250, result
    assert result.queue_id
    [got] = sink.wait_for(1, timeout=10)
    assert got.mail_from == "alice@example.com"
    assert sorted(got.rcpt_tos) == ["bob@example.net", "carol@example.net"]
    assert strip_first_received(got.data) == data
    assert got.message_id == msgid
    assert f"id {result.queue_id}" in got.header("Received")
    # The milter really saw this message, with Postfix's queue id at EOM.
    assert f"eom i={result.queue_id}" in noop_milter.events("eom")
    pf.wait_for_queue_empty(timeout=10)


@pytest.mark.postfix
def test_milter_down_tempfails_and_nothing_is_lost(postfix_factory, noop_milter, sink):
    pf = postfix_factory(noop_milter.socket, milter_default_action="tempfail")
    data, msgid = message("milter down")
    noop_milter.stop()

    refused = pf.send(data)

    assert refused.code == 451, refused
    assert refused.message.startswith("4.7.1"), refused
    assert pf.queue() == []
    pf.wait_for_log(r"connect to Milter service .*: Connection refused")

    noop_milter.start()  # same port
    accepted = pf.send(data)

    assert accepted.code == 250, accepted
    [got] = sink.wait_for(1, timeout=10)
    assert got.message_id == msgid
    pf.wait_for_queue_empty(timeout=10)
    assert len(sink.messages) == 1


@pytest.mark.postfix
def test_sink_tempfail_is_retried(postfix_factory, noop_milter, sink):
    """A 4xx from the next hop leaves the mail queued; a retry delivers it."""
    pf = postfix_factory(noop_milter.socket)
    sink.fail(451, "4.3.0 sink says later", stage="data", times=1)
    data, msgid = message("retry me")

    assert pf.send(data).code == 250
    pf.wait_for_log(r"status=deferred \(host .* said: 451 4\.3\.0 sink says later")
    pf.flush()

    assert sink.wait_for_message_id(msgid, timeout=15)
    pf.wait_for_queue_empty(timeout=10)


@pytest.mark.postfix
def test_hold_queue_and_xclient(tmp_path, postfix_factory, noop_milter, sink):
    """hold_queue() sees held mail; XCLIENT changes the client the milter sees."""
    checks = tmp_path / "header_checks"
    checks.write_text("/^Subject: please hold/ HOLD held by test\n")
    pf = postfix_factory(noop_milter.socket,
                         extra_main_cf={"header_checks": f"regexp:{checks}"})
    data, _ = message("please hold")

    result = pf.send(data, xclient={"ADDR": "192.0.2.7", "NAME": "mail.example.org"})

    assert result.code == 250, result
    assert pf.hold_queue() == [result.queue_id]
    assert "connect mail.example.org ('192.0.2.7'" in " | ".join(noop_milter.events("connect"))
    pf.release_hold()
    [got] = sink.wait_for(1, timeout=10)
    assert "[192.0.2.7]" in got.header("Received")
    pf.wait_for_queue_empty(timeout=10)


@pytest.mark.skipif(shutil.which("miltertest") is None, reason="miltertest is not installed")
def test_miltertest_noop_script(noop_milter):
    proc = run_miltertest("noop.lua", noop_milter.socket, queue_id="MTQ")

    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "noop.lua: ok" in proc.stdout
    assert noop_milter.events("eom") == ["eom i=MTQ1", "eom i=MTQ2"]


def test_miltertest_failure_is_reported(noop_milter, tmp_path):
    """A failing script exits non-zero and says why (miltertest alone would not)."""
    if shutil.which("miltertest") is None:
        pytest.skip("miltertest is not installed")
    script = tmp_path / "expect_reject.lua"
    script.write_text(
        'dofile(testdir .. "/lib.lua")\n'
        "main(function()\n"
        "  local conn = open_conn()\n"
        '  step(conn, "eom", SMFIR_REJECT, mt.eom)\n'
        "end)\n")

    proc = run_miltertest(script, noop_milter.socket)

    assert proc.returncode != 0
    assert "eom: expected REJECT, got ACCEPT" in proc.stderr


def test_parse_verdicts_reads_json_after_the_word_verdict():
    log = (
        "2024-01-01 INFO starting\n"
        '2024-01-01 INFO verdict {"queue_id": "ABC", "message_id": "<m1@x>", '
        '"symbols": ["A", "B"], "action": "accept", "from": "a@x", "score": 1.5}\n'
        'INFO verdict {"message_id": "<m2@x>", "symbols": [{"name": "C", "weight": 2}]} trailing\n'
        "INFO verdict {broken\n"
    )

    v1, v2 = parse_verdicts(log)

    assert v1.queue_id == "ABC" and v1.from_ == "a@x" and v1.symbols == ["A", "B"]
    assert v2.symbols == ["C"] and v2["symbols"][0]["weight"] == 2
