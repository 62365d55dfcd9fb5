"""The header checks' own parsing, against what the standard library makes of the same text."""

from __future__ import annotations

import email
import email.policy
import os
from pathlib import Path

import pytest

from milterguard.checks.headers import _parse_date, _parse_date_slow

CORPUS = Path(os.environ.get("MILTERGUARD_CORPUS", "/work/shared/corpus")) / "spamassassin"


@pytest.mark.parametrize("text", [
    "Mon, 2 Jan 2023 10:00:00 +0000",
    "2 Jan 2023 10:00 -0530",
    "Tue,  3 Sep 2002 23:59:59 +1200 (NZST)",
    "Mon, 2 Jan 2023 10:00:00 -0000",
    "Mon, 31 Feb 2023 10:00:00 +0000",  # no such day
    "Mon, 2 Jan 2023 24:00:00 +0000",  # no such hour
    "Mon, 2 Jan 2023 10:00:60 +0000",  # leap second
    "Mon, 2 Jan 2023 10:00:00 +9999",  # no such zone
    "Mon, 2 Jan 0000 10:00:00 +0000",  # a year the email package reads as 2000
    "Mon, 2 Jan 2023 10:00:00 EST",  # named zone: the email package's parser
    "Mon, 2 Jan 23 10:00:00 +0000",  # two-digit year: the same
    "yesterday",
])
def test_the_fast_date_reading_agrees_with_the_email_package(text):
    assert _parse_date(text) == _parse_date_slow(text)


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared corpus is not there")
def test_it_agrees_on_every_date_of_the_corpus():
    values = []
    for path in sorted(CORPUS.glob("*/*.eml"))[::3]:
        msg = email.message_from_binary_file(path.open("rb"), policy=email.policy.compat32)
        values += [str(v) for v in msg.get_all("Date", [])]
        values += [str(v).rpartition(";")[2] for v in msg.get_all("Received", [])]
    assert len(values) > 3000
    assert [v for v in values if _parse_date(v) != _parse_date_slow(v)] == []
