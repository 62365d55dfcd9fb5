"""milterguard end to end: Postfix -> milterguard -> sink, all real, on loopback.

The canary strings have fixed actions, so these tests never depend on tuned weights.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import smtplib
import subprocess
import time
import uuid

import pytest

from support import free_port, pid_alive, socket_accepts, wait_until

pytestmark = pytest.mark.postfix


def message(body: str, subject: str = "end to end", extra_headers: str = "") -> tuple[bytes, str]:
    msgid = f"{uuid.uuid4().hex}@example.com"
    text = (
        "From: Alice Example <alice@example.com>\r\n"
        "To: Bob Example <bob@example.net>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 02 Jan 2023 10:00:00 +0000\r\n"
        f"Message-ID: <{msgid}>\r\n"
        f"{extra_headers}"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{body}\r\n"
    )
    return text.encode("utf-8"), f"<{msgid}>"


@pytest.fixture
def mg(milterguard_factory):
    return milterguard_factory(workers=2)


@pytest.fixture
def pf(postfix_factory, mg):
    return postfix_factory(mg)


def test_clean_message_arrives_with_score_headers(pf, mg, sink):
    raw, msgid = message("Hello Bob, the minutes of today's call are in the wiki. MILTERGUARD-CANARY-CLEAN")
    assert pf.send(raw).code == 250
    got = sink.wait_for_message_id(msgid)
    assert got.header("X-Spam-Flag") == "NO"
    assert got.header("X-Spam-Score") is not None
    assert "action=accept" in got.header("X-Spam-Status")
    verdict = mg.verdict_for(msgid)
    assert verdict.action == "accept" and verdict.has("CANARY_CLEAN")
    assert verdict["queue_id"]


def test_reject_canary_gets_550_and_is_not_delivered(pf, mg, sink):
    raw, msgid = message("MILTERGUARD-CANARY-REJECT")
    result = pf.send(raw)
    assert result.code == 550
    assert "5.7.1" in result.message
    assert mg.verdict_for(msgid).action == "reject"
    assert not any(m.message_id == msgid for m in sink.messages)


def test_review_canary_is_held_with_mta_hold(postfix_factory, milterguard_factory, sink):
    mg = milterguard_factory(workers=1, sets={"quarantine.mode": "mta-hold"})
    pf = postfix_factory(mg)
    raw, msgid = message("MILTERGUARD-CANARY-REVIEW")
    assert pf.send(raw).code == 250
    assert mg.verdict_for(msgid).action == "review"
    held = wait_until(lambda: pf.hold_queue() or None, 10, what="a message in the hold queue")
    assert len(held) == 1
    pf.release_hold()
    got = sink.wait_for_message_id(msgid)
    assert got.header("X-Spam-Flag") == "YES"


def test_tag_canary_is_delivered_tagged(pf, mg, sink):
    raw, msgid = message("MILTERGUARD-CANARY-TAG", subject="quarterly report")
    assert pf.send(raw).code == 250
    got = sink.wait_for_message_id(msgid)
    assert got.header("X-Spam-Flag") == "YES"
    assert got.header("Subject") == "[SPAM] quarterly report"
    assert "CANARY_TAG" in got.header("X-Spam-Symbols")


def test_upstream_spam_headers_are_removed(pf, mg, sink):
    forged = "X-Spam-Flag: NO\r\nX-Spam-Score: -100\r\nX-Spam-Status: No, whitelisted\r\nX-Spam-Flag: NO\r\n"
    raw, msgid = message("MILTERGUARD-CANARY-TAG", extra_headers=forged)
    assert pf.send(raw).code == 250
    got = sink.wait_for_message_id(msgid)
    assert got.message.get_all("X-Spam-Flag") == ["YES"]
    assert got.message.get_all("X-Spam-Score") != ["-100"] and len(got.message.get_all("X-Spam-Score")) == 1
    assert "whitelisted" not in got.data.decode("utf-8", "replace")


def test_blocked_client_is_refused_at_rcpt(pf, mg, sink):
    # 192.0.2.66 is in the shipped blocked_clients.map; XCLIENT makes Postfix report it.
    raw, msgid = message("nothing special")
    result = pf.send(raw, xclient={"ADDR": "192.0.2.66", "NAME": "bad.example.net"})
    assert result.code == 550
    assert result.stage == "rcpt"
    verdict = wait_until(lambda: next((v for v in mg.verdicts() if v.has("CLIENT_BLOCKED")), None), 10,
                         what="the CLIENT_BLOCKED verdict", on_timeout=mg.log_tail)
    assert verdict.action == "reject" and verdict["stage"] == "connect"


def test_shadow_mode_changes_nothing(postfix_factory, milterguard_factory, sink):
    mg = milterguard_factory(workers=1, sets={"actions.mode": "shadow"})
    pf = postfix_factory(mg)
    raw, msgid = message("MILTERGUARD-CANARY-REJECT")
    assert pf.send(raw).code == 250
    got = sink.wait_for_message_id(msgid)
    assert got.header("X-Spam-Flag") is None
    verdict = mg.verdict_for(msgid)
    assert verdict.action == "reject" and verdict.applied == "accept"


def test_tag_only_mode_never_rejects(postfix_factory, milterguard_factory, sink):
    mg = milterguard_factory(workers=1, sets={"actions.mode": "tag-only"})
    pf = postfix_factory(mg)
    raw, msgid = message("MILTERGUARD-CANARY-REJECT")
    assert pf.send(raw).code == 250
    got = sink.wait_for_message_id(msgid)
    assert got.header("X-Spam-Flag") == "YES"
    assert mg.verdict_for(msgid).applied == "tag"


BROKEN_RULES = "- symbol: BROKEN\n  weight: [1\n"
LOCAL_RULE = """
- symbol: LOCAL_WORD
  weight: 0
  action: reject
  description: a local rule added at run time
  match: {body: 'zanzibar-quokka'}
"""


def test_sighup_with_broken_rules_keeps_serving_old_rules(pf, mg, sink):
    mg.write_rules("broken", BROKEN_RULES)
    mg.reload()
    wait_until(lambda: "reload refused" in mg.log_text() or None, 10, what="the refused reload", on_timeout=mg.log_tail)
    raw, msgid = message("MILTERGUARD-CANARY-REJECT")
    assert pf.send(raw).code == 550
    raw, msgid = message("plain MILTERGUARD-CANARY-CLEAN")
    assert pf.send(raw).code == 250
    sink.wait_for_message_id(msgid)


def test_sighup_loads_new_rules_for_new_connections(pf, mg, sink):
    raw, msgid = message("zanzibar-quokka")
    assert pf.send(raw).code == 250
    mg.write_rules("local", LOCAL_RULE)
    mg.reload()
    wait_until(lambda: mg.log_text().count("new configuration in use") >= 2 or None, 15,
               what="both workers on the new rules", on_timeout=mg.log_tail)
    raw, msgid = message("zanzibar-quokka")
    assert pf.send(raw).code == 550


def test_killed_worker_loses_no_mail(pf, mg, sink):
    workers = wait_until(lambda: (lambda w: w if len(w) == 2 else None)(mg.worker_pids()), 10, what="two workers")
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: not pid_alive(workers[0]) or None, 5, what="the worker to die")
    sent = []
    for n in range(6):
        raw, msgid = message(f"message {n} after a worker died MILTERGUARD-CANARY-CLEAN")
        result = pf.send(raw)
        # A session cut by the dying worker gets 4xx from Postfix (milter_default_action=tempfail):
        # the sender keeps the message and tries again, so nothing is lost.
        if result.code != 250:
            assert 400 <= result.code < 500
            result = pf.send(raw)
        assert result.code == 250
        sent.append(msgid)
    for msgid in sent:
        sink.wait_for_message_id(msgid)
    now = wait_until(lambda: (lambda w: w if len(w) == 2 else None)(mg.worker_pids()), 10, what="a new worker")
    assert workers[0] not in now


def test_sigterm_drains_and_exits(pf, mg, sink):
    raw, msgid = message("last one MILTERGUARD-CANARY-CLEAN")
    assert pf.send(raw).code == 250
    sink.wait_for_message_id(msgid)
    assert mg.stop() == 0
    assert "stopped" in mg.log_text()


def big_message(size: int, marker: str) -> tuple[bytes, str]:
    line = ("All work and no play makes a dull message. " * 2 + "\r\n")
    body = marker + "\r\n" + line * (size // len(line))
    return message(body)


def vanishing_spool(tmp_path) -> str:
    """A spool directory that passes the configuration's check; it is removed once the filter runs."""
    spool = tmp_path / "spool"
    spool.mkdir()
    return str(spool)


def test_filter_failure_tempfails_unauthenticated_mail(postfix_factory, milterguard_factory, sink, tmp_path):
    # A spool directory removed under a running filter makes every body past spool_bytes fail
    # to spool: a fault of the filter itself, not of a check.
    spool = vanishing_spool(tmp_path)
    mg = milterguard_factory(workers=1, sets={"message.spool_bytes": "1K", "message.spool_dir": spool})
    os.rmdir(spool)
    pf = postfix_factory(mg)
    raw, msgid = big_message(20_000, "MILTERGUARD-CANARY-CLEAN")
    result = pf.send(raw)
    assert result.code == 451
    assert "internal error in body" in mg.log_text()
    assert "on_error=tempfail" in mg.log_text()
    small, small_id = message("short MILTERGUARD-CANARY-CLEAN")
    assert pf.send(small).code == 250  # the next message is filtered as usual
    sink.wait_for_message_id(small_id)


def test_filter_failure_accepts_when_configured(postfix_factory, milterguard_factory, sink, tmp_path):
    spool = vanishing_spool(tmp_path)
    mg = milterguard_factory(workers=1, sets={"message.spool_bytes": "1K", "message.spool_dir": spool,
                                              "actions.on_error.unauthenticated": "accept"})
    os.rmdir(spool)
    pf = postfix_factory(mg)
    raw, msgid = big_message(20_000, "MILTERGUARD-CANARY-REJECT")
    assert pf.send(raw).code == 250
    got = sink.wait_for_message_id(msgid)
    assert got.header("X-Spam-Flag") is None  # accepted unfiltered, and logged so
    assert "on_error=accept" in mg.log_text()


def test_large_message_is_spooled_scanned_in_part_and_delivered(postfix_factory, milterguard_factory, sink):
    mg = milterguard_factory(workers=1, sets={"message.spool_bytes": "64K", "message.max_scan_bytes": "256K"})
    pf = postfix_factory(mg, extra_main_cf={"message_size_limit": "40000000"})
    raw, msgid = big_message(8_000_000, "MILTERGUARD-CANARY-TAG")
    assert pf.send(raw).code == 250
    got = sink.wait_for_message_id(msgid, timeout=60)
    assert got.header("X-Spam-Flag") == "YES"  # the canary near the top was still seen
    verdict = mg.verdict_for(msgid)
    assert verdict.has("SCAN_TRUNCATED") and verdict.action == "tag"


def _stop_and_time(mg, timeout: float = 40.0) -> tuple[int | None, float]:
    """SIGTERM as systemd sends it: one signal, no connection to wake the listener."""
    start = time.monotonic()
    mg.proc.send_signal(signal.SIGTERM)
    try:
        rc = mg.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.monotonic() - start


def test_idle_stop_exits_at_once(pf, mg, sink):
    raw, msgid = message("before the stop MILTERGUARD-CANARY-CLEAN")
    assert pf.send(raw).code == 250
    sink.wait_for_message_id(msgid)
    rc, took = _stop_and_time(mg)
    assert rc == 0, mg.log_tail()
    assert took < 2.0, f"an idle stop took {took:.1f}s\n{mg.log_tail()}"


def test_stop_mid_data_finishes_the_session_with_its_real_answer(pf, mg, sink):
    # The client is in the middle of DATA when the stop comes: its message must get the
    # filter's real answer (250 here), not a 451 after the drain timeout.
    raw, msgid = message("cut in two by a stop MILTERGUARD-CANARY-CLEAN")
    head, tail = raw[: len(raw) // 2], raw[len(raw) // 2:]
    smtp = smtplib.SMTP(pf.host, pf.smtpd_port, timeout=60)
    try:
        smtp.ehlo("client.example.org")
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.net")[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(head)
        time.sleep(0.3)
        start = time.monotonic()
        mg.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        smtp.send(tail + b"\r\n.\r\n")
        code, text = smtp.getreply()
        answered = time.monotonic() - start
        smtp.quit()
    finally:
        smtp.close()
    assert code == 250, f"{code} {text!r}\n{mg.log_tail()}"
    assert answered < 3.0, f"the answer took {answered:.1f}s"
    mg.proc.wait(10)
    stopped = time.monotonic() - start
    assert stopped < 5.0, f"the stop took {stopped:.1f}s\n{mg.log_tail()}"
    sink.wait_for_message_id(msgid)
    assert mg.verdict_for(msgid).action == "accept"


def test_stop_refuses_new_sessions_and_finishes_open_ones(pf, mg, sink):
    # A session that has only said MAIL FROM (which needs no reply from the filter, so
    # none of its callbacks may have run yet) keeps the filter running, while a
    # connection made after the stop is refused: the MTA applies milter_default_action
    # to it, or reaches the instance that replaces this one.
    raw, msgid = message("sent across a stop MILTERGUARD-CANARY-CLEAN")
    smtp = smtplib.SMTP(pf.host, pf.smtpd_port, timeout=60)
    try:
        smtp.ehlo("client.example.org")
        assert smtp.mail("alice@example.com")[0] == 250
        mg.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert not socket_accepts(mg.socket, timeout=0.5)
        assert smtp.rcpt("bob@example.net")[0] == 250
        code, text = smtp.data(raw)
        smtp.quit()
    finally:
        smtp.close()
    assert code == 250, f"{code} {text!r}\n{mg.log_tail()}"
    assert mg.proc.wait(10) == 0
    sink.wait_for_message_id(msgid)


def test_stopping_instance_leaves_the_socket_of_its_successor(milterguard_factory, tmp_path):
    # A restart where the new instance binds the path before the old one has finished
    # stopping: the old one must not remove the new one's socket file.
    path = tmp_path / "milterguard.sock"
    old = milterguard_factory(workers=1, socket=f"unix:{path}")
    new = milterguard_factory(workers=1, socket=f"unix:{path}")
    assert old.stop() == 0
    assert path.exists(), new.log_tail()
    assert socket_accepts(new.socket)
    assert new.stop() == 0
    assert not path.exists()  # its own, it removes


def test_unix_socket_has_its_mode_under_umask_000(milterguard_factory, tmp_path):
    path = tmp_path / "milterguard.sock"
    old = os.umask(0)
    try:
        mg = milterguard_factory(workers=1, socket=f"unix:{path}", sets={"milter.unix_socket_mode": "0660"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660, mg.log_tail()


def test_invalid_unix_socket_mode_refuses_to_start(milterguard_factory, tmp_path):
    mg = milterguard_factory(workers=1, socket=f"unix:{tmp_path / 'milterguard.sock'}",
                             sets={"milter.unix_socket_mode": "0999"}, start=False)
    result = subprocess.run(mg.argv(), capture_output=True, text=True, timeout=60, env=mg._environ())
    assert result.returncode != 0
    assert "milter.unix_socket_mode" in result.stderr
    assert not (tmp_path / "milterguard.sock").exists()


def test_verdict_line_of_a_message_with_1000_recipients_stays_short(postfix_factory, milterguard_factory, sink):
    # Syslog cuts long lines; the verdict line keeps under log.verdict_max_bytes and
    # says how many recipients it left out.
    mg = milterguard_factory(workers=1)
    pf = postfix_factory(mg, extra_main_cf={"smtpd_recipient_limit": "2000"})
    raw, msgid = message("to a crowd MILTERGUARD-CANARY-CLEAN")
    rcpts = [f"member{n:04d}@lists.example.net" for n in range(1000)]
    assert pf.send(raw, rcpts=rcpts).code == 250
    verdict = mg.verdict_for(msgid)
    assert len(verdict.line.encode("utf-8")) <= 2048 + 200  # the line's prefix (time, pid, level) comes on top
    shown = verdict["rcpts"]
    assert shown and shown == rcpts[: len(shown)]
    assert len(shown) + verdict["rcpts_more"] == 1000
    assert verdict.has("CANARY_CLEAN") and verdict.action == "accept"


def test_clamd_outage_costs_one_log_line_per_worker(postfix_factory, milterguard_factory, sink):
    # Nothing listens on the port: clamd is down for the whole test.
    mg = milterguard_factory(workers=1, sets={"clamav.address": f"127.0.0.1:{free_port()}"})
    pf = postfix_factory(mg)
    for n in range(8):
        raw, msgid = message(f"message {n} while clamd is down MILTERGUARD-CANARY-CLEAN")
        assert pf.send(raw).code in (250, 451)
        assert mg.verdict_for(msgid).has("CLAMAV_TEMPFAIL")
    lines = [line for line in mg.log_text().splitlines() if "clamd" in line.lower() and "verdict {" not in line
             and "ClamAV at" not in line]
    assert len(lines) <= 2, "\n".join(lines)


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} milterguard\[\d+\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def test_every_line_of_the_start_has_time_and_level(milterguard_factory, tmp_path):
    # Issue 11: the first lines (Redis down at start, say) came before logging was set up,
    # without time or level.  Redis and clamd are down here, and a local rule has no examples.
    mg = milterguard_factory(workers=1, sets={"redis.url": f"redis://127.0.0.1:{free_port()}/0",
                                              "clamav.address": f"127.0.0.1:{free_port()}"},
                             rules={"local": "- symbol: LOCAL_SHOUT\n  weight: 1\n  description: shouting\n"
                                             "  match: {header: Subject, regex: '^[A-Z ]{20,}$'}\n"})
    wait_until(lambda: "worker" in mg.log_text() and "started" in mg.log_text(), 10, what="a worker started")
    assert mg.stop() == 0
    lines = [line for line in mg.log_text().splitlines() if line.strip()]
    assert any("Redis" in line and "unavailable" in line for line in lines), lines
    assert [line for line in lines if not _LOG_LINE.match(line)] == [], "\n".join(lines)


def test_a_refused_start_says_why_in_a_log_line(milterguard_factory, tmp_path):
    mg = milterguard_factory(workers=1, sets={"milter.unix_socket_mode": "0999"}, start=False)
    result = subprocess.run(mg.argv(), capture_output=True, text=True, timeout=60, env=mg._environ())
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(_LOG_LINE.match(line) for line in lines), result.stderr
    assert "milter.unix_socket_mode" in result.stderr
