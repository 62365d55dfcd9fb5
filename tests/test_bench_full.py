"""bench/run.py's full configuration on a handful of messages: the records, the learning and
the checks the benchmark relies on work, so that a long run measures a filter doing the
whole job.  Only milterguard's side (f) runs here; Rspamd's (g) needs the rspamd package
and minutes to compile its regular expressions on a fresh machine.  Throughput and latency
are the benchmark's business, not this test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import corpus_dir
from support.dns import nsd_available
from support.postfix import postfix_available
from support.redis import redis_available

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import full  # noqa: E402

SPAM = 12
HAM = 12
MESSAGE = "spamassassin/spam/00009.027bf6e0b0c4ab34db3ce0ea4bf2edab.eml"  # the benchmark's default


def _skip_reason() -> str | None:
    for tool in ("/usr/sbin/smtp-source", "/usr/sbin/smtp-sink"):
        if not os.path.exists(tool):
            return f"{tool} is missing (Debian package postfix)"
    return postfix_available() or nsd_available() or (None if redis_available() else "redis-server is not installed")


def test_full_configuration_runs_every_check(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    message = corpus_dir() / MESSAGE
    if not message.exists():
        pytest.skip(f"no corpus at {corpus_dir()} (set MILTERGUARD_CORPUS)")
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(BENCH / "run.py"), "--configs", "f", "--rounds", "1", "--messages", "12",
           "--concurrency", "4", "--latency-messages", "4", "--profile", "0", "--socket", "unix",
           "--train-limit", str(SPAM), "--min-learns", "5", "--max-minutes", "3", "--message", str(message),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == [] and proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Learned what it was given: the benchmark's own message is not among it.
    learning = result["learning"]["f"]
    assert (learning["learned_spam"], learning["learned_ham"]) == (SPAM, HAM)
    assert learning["fuzzy_added"] > 0
    # After the warm-up and at the end: SPF, DKIM, DMARC and ARC passed against the local nsd,
    # Bayes answered, and no socket of the filter or its Redis led beyond loopback.
    checks = result["full_checks"]["f"]
    assert len(checks) == 2
    for check in checks:
        assert check["missing"] == [] and check["foreign_sockets"] == []
        assert set(full.EXPECTED) <= set(check["symbols"])
    cell = result["summary"]["f"]["4"]
    assert cell["rounds"] == 1 and cell["incomplete"] == 0
    assert result["latency"]["f"]["ok"] == 4


def test_signed_message_and_zones_agree(tmp_path):
    """The signature and seal the benchmark adds verify with the keys its zones publish."""
    import dkim

    raw = b"From: Someone <someone@bench-sender.test>\nTo: <user@example.net>\nSubject: figures\n" \
          b"Date: Mon, 02 Jan 2023 10:00:00 +0000\nMessage-ID: <1@bench-sender.test>\n\nThe figures.\n"
    zones, dkim_key, arc_key = full.auth_zones("bench-sender.test")
    signed = full.signed_message(raw, "bench-sender.test", dkim_key, arc_key)
    records = {}
    for zone in zones:
        for name, rtype, data, _ in zone.records:
            if rtype == "TXT":
                records[f"{name}.{zone.origin}".encode()] = "".join(data.split('"')[1::2]).encode()
    wire = signed.replace(b"\n", b"\r\n")
    lookup = lambda name, timeout=5: records.get(name.rstrip(b"."))  # noqa: E731
    assert dkim.verify(wire, dnsfunc=lookup)
    cv, _, reason = dkim.arc_verify(wire, dnsfunc=lookup)
    assert cv == dkim.CV_Pass, reason
    sender = zones[0]
    assert ("@", "TXT") in {(n, t) for n, t, _, _ in sender.records}
    assert any(n == "_dmarc" for n, _, _, _ in sender.records)


def test_rspamd_task_line_symbols():
    line = ("2026-12-07 03:35:44 #2517(rspamd_proxy) <3fe6bf>; proxy; rspamd_task_write_log: id: <x@y>, "
            "qid: <456CF2185D5>, ip: 127.0.0.1, from: <a@b.test>, (default: T (add header): [8.20/6.00] "
            "[BAYES_SPAM(5.10){100.00%;},R_DKIM_ALLOW(0.00){b.test:s=bench;},R_SPF_ALLOW(0.00){+ip4:127.0.0.1:c;},"
            "ARC_ALLOW(0.00){relay.bench.test:s=arc:i=1;},DMARC_POLICY_ALLOW(0.00){b.test;reject;}]), len: 6074, "
            "time: 29.922ms, dns req: 1")
    scans = full.rspamd_symbols(line + "\n" + line.replace("BAYES_SPAM(5.10){100.00%;},", ""))
    assert scans[0][0] == "BAYES_SPAM" and full.check_auth(scans[0]) == []
    assert full.check_auth(scans[1]) == ["BAYES_SPAM|BAYES_HAM"]
    assert full.check_auth([]) == [*full.EXPECTED, "BAYES_SPAM|BAYES_HAM"]
