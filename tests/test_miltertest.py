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
