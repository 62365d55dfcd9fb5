"""milterguard driven by miltertest: the milter protocol without an MTA."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import run_miltertest

SCRIPTS = Path(__file__).parent / "miltertest"


@pytest.fixture
def mg(milterguard_factory):
    return milterguard_factory(workers=1)


def test_stages_through_the_milter_protocol(mg):
    result = run_miltertest(SCRIPTS / "milterguard_stages.lua", mg.socket)
    assert result.returncode == 0, result.stderr + result.stdout + mg.log_tail()
    verdicts = mg.verdicts()
    by_qid = {v["queue_id"]: v for v in verdicts}
    assert "ABORTED1" not in by_qid  # an aborted transaction gives no verdict
    assert by_qid["TAGGED2"].action == "tag"
    assert by_qid["REJECT3"].action == "reject"
    assert by_qid["TAGGED2"]["client"] == "2001:db8::25"
    blocked = [v for v in verdicts if v.has("CLIENT_BLOCKED")]
    assert len(blocked) == 1 and blocked[0]["client"] == "192.0.2.66"
    assert "internal error" not in mg.log_text()


def test_eight_bit_envelope_and_headers_do_not_break_the_session(mg):
    result = run_miltertest(SCRIPTS / "milterguard_8bit.lua", mg.socket)
    assert result.returncode == 0, result.stderr + result.stdout + mg.log_tail()
    verdict = next(v for v in mg.verdicts() if v["queue_id"] == "EIGHTBIT1")
    assert verdict.action == "tag"
    # pymilter cannot hand over a HELO name that is not UTF-8; the session goes on without it.
    assert verdict["helo"] == "" and verdict["client"] == "198.51.100.77"
    assert verdict["from"] == "j\ufffdrgen@example.com"
    assert "internal error" not in mg.log_text()
