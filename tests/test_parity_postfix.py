"""The milter and `milterguard scan` drive one stage pipeline: for the same message
and envelope they find the same symbols and the same score.

Corpus messages go through a real Postfix to the filter in shadow mode (so
that the message the sink gets is the one the filter saw, but for the
Received header Postfix adds and does not show the milter), and the
delivered copy is then scanned with the same configuration and envelope.  A rule on the recipient shows that the
RCPT stage runs in both, with actions.early_reject on and off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import LOOPBACK, corpus_dir
from support.mailgen import strip_message_id

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

SENDER = "parity@sender.example"
RCPT = "someone@example.net"
HELO = "client.example.org"
RCPT_RULE = """
- symbol: PARITY_RCPT_SEEN
  group: envelope
  weight: 0.5
  description: The recipient is the one this test sends to
  match: {rcpt: '^someone@example\\.net$'}
"""
PER_FOLDER = 6  # messages taken from each corpus folder, spread evenly over it


def sample() -> list[bytes]:
    root = corpus_dir()
    folders = [root / "spamassassin" / "ham", root / "spamassassin" / "spam",
               root / "modern" / "ham", root / "modern" / "spam"]
    found = []
    for folder in folders:
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(("cmds", ".")))
        step = max(1, len(files) // PER_FOLDER)
        found += [p.read_bytes() for p in files[::step][:PER_FOLDER]]
    if len(found) < 2 * PER_FOLDER:
        pytest.skip(f"no corpus at {root} (set MILTERGUARD_CORPUS)")
    return found


def with_message_id(raw: bytes, index: int) -> tuple[bytes, str]:
    """RAW with a Message-ID of our own instead of its own, by which the verdict is found."""
    msgid = f"parity-{index}-{os.getpid()}@test.invalid"
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return f"Message-ID: <{msgid}>\r\n".encode() + strip_message_id(raw), msgid


def without_our_received(data: bytes) -> bytes:
    """The delivered copy less the Received header our Postfix put on top."""
    assert data.startswith(b"Received: from "), data[:200]
    lines = data.split(b"\r\n")
    end = 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    assert b"by mx.test.invalid" in b"".join(lines[:end])
    return b"\r\n".join(lines[end:])


@pytest.mark.parametrize("early_reject", ["true", "false"])
def test_scan_finds_what_the_milter_found(milterguard_factory, postfix_factory, sink, tmp_path, early_reject):
    sets = {"actions.mode": "shadow", "actions.early_reject": early_reject, "dns.enabled": "false"}
    mg = milterguard_factory(workers=1, sets=sets, rules={"parity.yaml": RCPT_RULE})
    pf = postfix_factory(mg, extra_main_cf={"disable_mime_output_conversion": "yes"})
    sent = []
    for index, raw in enumerate(sample()):
        raw, msgid = with_message_id(raw, index)
        if pf.send(raw, sender=SENDER, rcpts=[RCPT], helo=HELO).code == 250:
            sent.append(msgid)
    assert len(sent) >= 10, "too few corpus messages got through Postfix"

    delivered = tmp_path / "delivered"
    delivered.mkdir()
    milter: dict[str, tuple[float, set[str]]] = {}
    for number, msgid in enumerate(sent):
        got = sink.wait_for_message_id(f"<{msgid}>", timeout=30)
        (delivered / f"{number:03d}.eml").write_bytes(without_our_received(got.data))
        verdict = mg.verdict_for(msgid)
        milter[msgid] = (verdict["score"], set(verdict["symbols"]))

    cmd = [sys.executable, "-m", "milterguard", "scan", "--json", "--etc-dir", str(mg.etc_dir),
           "--ip", LOOPBACK, "--client-name", "localhost", "--helo", HELO, "--from", SENDER, "--rcpt", RCPT]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    out = subprocess.run(cmd + [str(delivered)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scanned = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(scanned) == len(sent)
    for number, record in enumerate(scanned):
        msgid = sent[number]
        score, symbols = milter[msgid]
        found = {s["name"] for s in record["symbols"]}
        assert "PARITY_RCPT_SEEN" in symbols, f"{msgid}: the milter ran no RCPT stage: {sorted(symbols)}"
        assert found == symbols, (f"{msgid}: only the milter: {sorted(symbols - found)}; "
                                  f"only scan: {sorted(found - symbols)}")
        assert record["score"] == score, f"{msgid}: milter {score}, scan {record['score']}"
