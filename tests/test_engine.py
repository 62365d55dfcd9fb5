"""The engine: stages, failures inside checks, budgets, early verdicts."""

from __future__ import annotations

import pytest

from milterguard.config import load_config
from milterguard.checks import registry
from milterguard.engine.core import Engine
from milterguard.model import Action, Connection, Stage, Transaction, UndeclaredSymbol
from milterguard.mail.raw import split_message

MESSAGE = b"""From: Alice <alice@example.net>
To: bob@example.org
Subject: hello
Date: Mon, 02 Sep 2002 10:00:00 +0000
Message-ID: <abc.1@example.net>
Received: from mx.example.net by mx.example.org; Mon, 02 Sep 2002 10:00:05 +0000

Hello Bob.
"""

TEST_RULES = """
- symbol: TEST_BOOM
  weight: 1
  description: emitted by the failing test check
- symbol: TEST_SLOW
  weight: 1
  description: emitted by the slow test check
"""


@pytest.fixture
def test_checks(tmp_path):
    def boom(scan, hits):
        raise ZeroDivisionError("division by zero in a check")

    def sneaky(scan, hits):
        hits.add("TEST_SLOW")
        hits.add("SUBJ_FREE")  # not declared by this check

    registry.check(stage=Stage.EOM, emits=("TEST_BOOM",), name="test_boom")(boom)
    registry.check(stage=Stage.EOM, emits=("TEST_SLOW",), name="test_sneaky")(sneaky)
    (tmp_path / "rules.d").mkdir()
    (tmp_path / "rules.d" / "t.yaml").write_text(TEST_RULES)
    yield tmp_path
    registry.CHECKS.pop("test_boom", None)
    registry.CHECKS.pop("test_sneaky", None)


def run(engine, raw=MESSAGE, **conn):
    headers, body = split_message(raw)
    c = Connection(client_ip=conn.get("ip"), client_name=conn.get("name", ""), helo=conn.get("helo", ""))
    t = Transaction(mail_from="alice@example.net", rcpts=["bob@example.org"], headers=headers, body=body)
    return engine.evaluate(c, t)


def test_failing_check_becomes_a_symbol_not_a_crash(test_checks, caplog):
    engine = Engine.load(load_config(etc_dir=test_checks))
    verdict = run(engine)
    hit = verdict.hit("CHECK_ERROR")
    assert hit is not None and "test_boom" in hit.options and "ZeroDivisionError" in hit.text
    assert "check test_boom failed" in caplog.text
    # the other checks still ran
    assert verdict.hit("TEST_SLOW") is not None


def test_undeclared_symbol_raises_in_strict_mode_and_is_dropped_otherwise(test_checks):
    loose = Engine.load(load_config(etc_dir=test_checks))
    verdict = run(loose)
    assert verdict.hit("SUBJ_FREE") is None
    (test_checks / "local.d").mkdir()
    (test_checks / "local.d" / "off.yaml").write_text("checks: {disabled: [test_boom]}\n")
    strict = Engine.load(load_config(etc_dir=test_checks), strict=True)
    with pytest.raises(UndeclaredSymbol, match="test_sneaky emitted undeclared symbol SUBJ_FREE"):
        run(strict)


def test_budget_exhausted_skips_remaining_checks(tmp_path):
    engine = Engine.load(load_config(etc_dir=tmp_path, sets=["checks.message_budget=0"]))
    verdict = run(engine)
    hit = verdict.hit("CHECK_BUDGET_EXCEEDED")
    assert hit is not None and hit.options


def test_early_verdict_stops_at_connect(tmp_path):
    engine = Engine.load(load_config(etc_dir=tmp_path))
    verdict = run(engine, ip="192.0.2.66", name="x.example")
    assert verdict.action == Action.REJECT and verdict.stage == Stage.CONNECT
    assert verdict.symbols == ["CLIENT_BLOCKED"]


def test_early_verdict_can_be_switched_off(tmp_path):
    engine = Engine.load(load_config(etc_dir=tmp_path, sets=["actions.early_reject=false"]))
    verdict = run(engine, ip="192.0.2.66", name="x.example")
    assert verdict.action == Action.REJECT and verdict.stage == Stage.FINAL


def test_disabled_symbol_is_not_reported(tmp_path):
    engine = Engine.load(load_config(etc_dir=tmp_path, sets=["symbols.CLIENT_BLOCKED.enabled=false"]))
    verdict = run(engine, ip="192.0.2.66", name="x.example")
    assert verdict.hit("CLIENT_BLOCKED") is None and verdict.action == Action.ACCEPT


def test_same_message_same_verdict_across_runs(tmp_path):
    engine = Engine.load(load_config(etc_dir=tmp_path))
    assert run(engine).symbols == run(engine).symbols


def test_parser_limits_become_symbols(tmp_path):
    """A message past the MIME walker's part limit says so: what lies past it is not scanned."""
    from milterguard.mail.mime import MAX_PARTS

    parts = "".join(f"--b\nContent-Type: text/plain\n\npart {i}\n" for i in range(MAX_PARTS + 5))
    raw = (b"From: a@example.com\nTo: b@example.net\nSubject: many\nMIME-Version: 1.0\n"
           b'Content-Type: multipart/mixed; boundary="b"\n\n' + parts.encode() + b"--b--\n")
    verdict = run(Engine.load(load_config(etc_dir=tmp_path), strict=True), raw)
    assert "MIME_TOO_MANY_PARTS" in verdict.symbols and "MIME_TOO_DEEP" not in verdict.symbols
