"""Case files: a message and its envelope, and the exact set of symbols expected.

Each `tests/cases/<stage>/<what_it_shows>.case` holds a YAML header (the
envelope, `expect`, optionally `ignore`, `action` and `set`), a line `---`,
and the message.  The runner feeds it to the engine as the milter would and
reports both missing and extra symbols.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.engine.model import Connection, Transaction
from milterguard.rawmail import split_message

CASES = sorted((Path(__file__).parent / "cases").rglob("*.case"))


def load_case(path: Path):
    text = path.read_bytes()
    head, sep, message = text.partition(b"\n---\n")
    assert sep, f"{path}: no --- line between the case header and the message"
    return yaml.safe_load(head.decode()), message


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    cache = {}

    def get(sets: tuple[str, ...]) -> Engine:
        if sets not in cache:
            etc = tmp_path_factory.mktemp("etc")
            cache[sets] = Engine.load(load_config(etc_dir=etc, sets=list(sets)), strict=True)
        return cache[sets]

    return get


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_case(path, engines):
    case, message = load_case(path)
    # Case files carry no DNS zones: the checks that look things up (SPF, DKIM, DMARC, ARC,
    # blocklists; tests/test_auth_*.py test them against nsd) stay off unless a case sets dns.enabled.
    engine = engines(("dns.enabled=false",) + tuple(case.get("set", [])))
    headers, body = split_message(message)
    conn = Connection(
        client_ip=case.get("client_ip"),
        client_name=case.get("client_name", f"[{case['client_ip']}]" if case.get("client_ip") else "localhost"),
        helo=case.get("helo", ""),
        auth_user=case.get("auth", ""),
    )
    txn = Transaction(mail_from=case.get("mail_from", ""), rcpts=list(case.get("rcpt", ["user@example.org"])),
                      headers=headers, body=body, body_size=len(body))
    verdict = engine.evaluate(conn, txn)
    ignore = set(case.get("ignore", []))
    got = {h.symbol for h in verdict.hits} - ignore
    want = set(case.get("expect", []))
    missing, extra = sorted(want - got), sorted(got - want)
    assert not missing and not extra, f"missing {missing}, extra {extra}"
    if "action" in case:
        assert verdict.action.label == case["action"]
