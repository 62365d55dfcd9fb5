"""clients/outage.py: one line when a dependency goes, one when it is back, a bounded back-off."""

from __future__ import annotations

import logging
import time

from milterguard.clients.outage import Outage


def test_an_outage_is_two_lines_with_the_count_between(caplog):
    outage = Outage("clamd at 127.0.0.1:3310", logging.getLogger("test.outage"), start=0.05, cap=0.1)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(50):
            if outage.usable():
                outage.failed("connection refused")
        time.sleep(0.12)
        assert outage.usable()  # the back-off never exceeds its cap
        outage.succeeded()
        outage.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "unavailable: connection refused" in lines[0]
    assert "back after" in lines[1] and "50 calls failed or were skipped" in lines[1]


def test_one_caller_at_a_time_tries_a_dependency_that_is_away():
    outage = Outage("clamd at 127.0.0.1:3310", logging.getLogger("test.outage"), start=0.1, cap=0.4)
    outage.failed("timed out")
    time.sleep(0.12)
    assert outage.usable()  # the retry time has come: this caller tries
    assert not outage.usable() and not outage.usable()  # the others do not wait on it meanwhile
    outage.failed("timed out again")
    assert not outage.usable()
    time.sleep(0.22)
    assert outage.usable()
    outage.succeeded()
    assert outage.usable() and outage.usable()
