"""Messages held for review by a running milterguard, for the quarantine tests.

    raw, msgid = message("MILTERGUARD-CANARY-REVIEW")
    record, msgid = held_message(postfix, milterguard, cli)   # sent, reviewed, stored: its `list --json` record

`cli(*args) -> (status, stdout)` runs `milterguard quarantine ARGS...` with the
filter's configuration; each test module builds its own.
"""

from __future__ import annotations

import json
import uuid

from support import wait_until

SENDER = "alice@example.com"
RCPTS = ["bob@example.net", "carol@example.org"]


def message(body: str, subject: str = "held for review") -> tuple[bytes, str]:
    msgid = f"{uuid.uuid4().hex}@example.com"
    text = (f"From: Alice Example <{SENDER}>\r\nTo: Bob <bob@example.net>, Carol <carol@example.org>\r\n"
            f"Subject: {subject}\r\nDate: Mon, 02 Jan 2023 10:00:00 +0000\r\nMessage-ID: <{msgid}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}\r\n")
    return text.encode(), f"<{msgid}>"


def listed(cli, *args: str) -> list[dict]:
    status, out = cli("list", "--json", *args)
    assert status == 0
    return [json.loads(line) for line in out.splitlines()]


def held_message(postfix, milterguard, cli, body: str = "MILTERGUARD-CANARY-REVIEW",
                 raw_msgid: tuple[bytes, str] | None = None) -> tuple[dict, str]:
    """Send a review canary through POSTFIX and wait until MILTERGUARD stored it."""
    raw, msgid = raw_msgid or message(body)
    result = postfix.send(raw, SENDER, RCPTS)
    assert result.code == 250, result
    assert milterguard.verdict_for(msgid).action == "review"
    wait_until(lambda: any(r["queue_id"] == result.queue_id for r in listed(cli)) or None, 10,
               what="the stored message", on_timeout=milterguard.log_tail)
    [record] = [r for r in listed(cli) if r["queue_id"] == result.queue_id]
    return record, msgid
