"""Case files: a message and its envelope, and the exact set of symbols expected.

Each `tests/cases/<stage>/<what_it_shows>.case` holds a YAML header (the
envelope, `expect`, optionally `ignore`, `action`, `set` and `dns`), a line
`---`, and the message.  The runner feeds it to the engine as the milter would
and reports both missing and extra symbols.

A case with `dns:` (lines `name TYPE data`) runs with the lookups on, against
one nsd (tests/support/dns.py) that serves the records of every such case,
each in the zone of its registered domain; the others run with `dns.enabled`
false.  Since the server is shared, two cases may not give the same name and
type different data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from milterguard.mail.domains import org_domain
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Connection, Transaction
from milterguard.mail.raw import split_message
from support.dns import NsdServer, Zone, nsd_available

CASES = sorted((Path(__file__).parent / "cases").rglob("*.case"))


def load_case(path: Path):
    text = path.read_bytes()
    head, sep, message = text.partition(b"\n---\n")
    assert sep, f"{path}: no --- line between the case header and the message"
    return yaml.safe_load(head.decode()), message


def dns_records(case: dict, path: Path) -> list[tuple[str, str, str]]:
    """The case's `dns:` lines as (absolute name, TYPE, data)."""
    out = []
    for line in case.get("dns") or []:
        parts = str(line).split(None, 2)
        assert len(parts) == 3, f"{path}: dns line {line!r} is not `name TYPE data`"
        name, rtype, data = parts
        out.append((name.rstrip(".").lower(), rtype.upper(), data))
    return out


def case_zones(paths) -> list[Zone]:
    """The zones serving every case's records; an error if two cases disagree on a name and type."""
    owner: dict[tuple[str, str], tuple[Path, list[str]]] = {}
    for path in paths:
        mine: dict[tuple[str, str], list[str]] = {}
        for name, rtype, data in dns_records(load_case(path)[0], path):
            mine.setdefault((name, rtype), []).append(data)
        for key, datas in mine.items():
            if key in owner and sorted(owner[key][1]) != sorted(datas):
                raise AssertionError(f"{path}: {key[0]} {key[1]} differs from {owner[key][0]}; "
                                     "cases share one name server, give each its own domain")
            owner.setdefault(key, (path, datas))
    # The blocklists on by default (Spamhaus ZEN and DBL) answer "not listed" unless a case says otherwise.
    zones: dict[str, Zone] = {"spamhaus.org": Zone("spamhaus.org")}
    for (name, rtype), (_, datas) in sorted(owner.items()):
        origin = org_domain(name)
        zone = zones.setdefault(origin, Zone(origin))
        for data in datas:
            zone.add(name + ".", rtype, data)
    return list(zones.values())


@pytest.fixture(scope="module")
def case_dns(tmp_path_factory):
    """The address of the nsd serving the cases' records, started on first use."""
    server = None

    def get() -> str:
        nonlocal server
        if server is None:
            reason = nsd_available()
            if reason:
                pytest.skip(reason)
            server = NsdServer(tmp_path_factory.mktemp("nsd"), case_zones(CASES)).start()
        return server.address

    yield get
    if server is not None:
        server.stop()


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
def test_case(path, engines, case_dns):
    case, message = load_case(path)
    if case.get("dns"):
        dns_sets = (f"dns.nameservers={case_dns()}",)
    else:
        # No records: the checks that look things up (SPF, DKIM, DMARC, ARC, blocklists) stay off.
        dns_sets = ("dns.enabled=false",)
    # The shipped model is not what the cases test: it stays off unless a case turns it on.
    engine = engines(dns_sets + ("ml.default_model=",) + tuple(case.get("set", [])))
    headers, body = split_message(message)
    conn = Connection(
        client_ip=case.get("client_ip"),
        client_name=case.get("client_name", f"[{case['client_ip']}]" if case.get("client_ip") else "localhost"),
        helo=case.get("helo", ""),
        auth_user=case.get("auth", ""),
    )
    txn = Transaction(mail_from=case.get("mail_from", ""), rcpts=list(case.get("rcpt", ["user@example.org"])),
                      queue_id=case.get("queue_id", ""), headers=headers, body=body, body_size=len(body))
    verdict = engine.evaluate(conn, txn)
    ignore = set(case.get("ignore", []))
    got = {h.symbol for h in verdict.hits} - ignore
    want = set(case.get("expect", []))
    missing, extra = sorted(want - got), sorted(got - want)
    assert not missing and not extra, f"missing {missing}, extra {extra}"
    if "action" in case:
        assert verdict.action.label == case["action"]


def test_cases_may_not_disagree_on_a_record(tmp_path):
    a, b = tmp_path / "a.case", tmp_path / "b.case"
    a.write_text("dns: ['x.clash.test TXT one']\nexpect: []\n---\n\n")
    b.write_text("dns: ['x.clash.test TXT two']\nexpect: []\n---\n\n")
    with pytest.raises(AssertionError, match="differs"):
        case_zones([a, b])
    b.write_text("dns: ['x.clash.test TXT one', 'y.clash.test A 127.0.0.2']\nexpect: []\n---\n\n")
    zones = case_zones([a, b])
    assert [z.origin for z in zones] == ["spamhaus.org", "clash.test"]
    assert len(zones[1].records) == 2 and not zones[0].records
