"""DNS blocklists against a real nsd serving test lists: IP, domain and URI lists,
return-code maps, bitmasks, and the "your resolver is blocked" answers."""

from __future__ import annotations

import pytest

from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.model import Action
from support.authmail import message, scan
from support.dns import NsdServer, Zone, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

LISTED = "81.2.69.160"
BLOCKED = "81.2.69.161"
CLEAN = "81.2.69.162"
SPAMHAUS_LISTED = "81.2.69.190"
SPAMHAUS_REFUSED = "81.2.69.191"

LISTS = """
rbl:
  lists:
    test_ip: {zone: bl.test, kind: ip, symbol: RBL_TEST, codes: {127.0.0.2: RBL_TEST_SPAM, 127.0.0.10/31: RBL_TEST_DYNAMIC}}
    test_sender: {zone: dbl.test, kind: sender, symbol: RHSBL_TEST_SENDER}
    test_from: {zone: dbl.test, kind: from, symbol: RHSBL_TEST_FROM}
    test_uri: {zone: multi.test, kind: uri, bitmask: true, blocked: [127.0.0.1/32],
               codes: {127.0.0.8: URIBL_TEST_PH, 127.0.0.16: URIBL_TEST_MW}}
    test_uri_ip: {zone: bl.test, kind: uri_ip, symbol: URIBL_TEST_IP}
    test_received: {zone: bl.test, kind: received, symbol: RBL_TEST_RECEIVED}
"""

RULES = """
- symbol: RBL_TEST
  weight: 1
  description: listed by the test IP list
- symbol: RBL_TEST_SPAM
  weight: 3
  description: spam source in the test IP list
- symbol: RBL_TEST_DYNAMIC
  weight: 1
  description: dynamic range in the test IP list
- symbol: RBL_TEST_RECEIVED
  weight: 1
  description: a Received hop is in the test IP list
- symbol: RHSBL_TEST_SENDER
  weight: 2
  description: sender domain in the test domain list
- symbol: RHSBL_TEST_FROM
  weight: 2
  description: From domain in the test domain list
- symbol: URIBL_TEST_PH
  weight: 4
  description: URL domain in the test URI list (phishing bit)
- symbol: URIBL_TEST_MW
  weight: 4
  description: URL domain in the test URI list (malware bit)
- symbol: URIBL_TEST_IP
  weight: 4
  description: URL address in the test IP list
"""


def ptr(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


@pytest.fixture(scope="module")
def nsd(tmp_path_factory):
    bl = Zone("bl.test")
    bl.add(ptr(LISTED), "A", "127.0.0.2")
    bl.add(ptr("81.2.69.170"), "A", "127.0.0.11")
    bl.add(ptr(BLOCKED), "A", "127.255.255.254")
    bl.add(ptr("81.2.69.180"), "A", "127.0.0.2")
    dbl = Zone("dbl.test")
    dbl.add("spammer.test", "A", "127.0.1.2")
    dbl.add("mail.ours.test", "A", "127.0.1.2")  # would hit, were it looked up
    multi = Zone("multi.test")
    multi.add("bad.test", "A", "127.0.0.24")
    multi.add("refused.test", "A", "127.0.0.1")
    multi.add("ours.test", "A", "127.0.0.8")
    # The shipped Spamhaus lists (on by default), served here: a listing, and the error answers
    # Spamhaus gives a resolver it refuses.
    spamhaus = Zone("spamhaus.org")
    spamhaus.add(f"{ptr(SPAMHAUS_LISTED)}.zen", "A", "127.0.0.2")
    spamhaus.add(f"{ptr(SPAMHAUS_REFUSED)}.zen", "A", "127.255.255.254")
    spamhaus.add("phish-kit.test.dbl", "A", "127.0.1.4")
    spamhaus.add("refused-kit.test.dbl", "A", "127.255.255.255")
    spamhaus.add("as-ip.test.dbl", "A", "127.0.1.255")
    with NsdServer(tmp_path_factory.mktemp("nsd"), [bl, dbl, multi, spamhaus]) as server:
        yield server


def make_engine(tmp_path, nsd, *sets: str) -> Engine:
    etc = tmp_path / "etc"
    (etc / "local.d").mkdir(parents=True, exist_ok=True)
    (etc / "rules.d").mkdir(exist_ok=True)
    (etc / "local.d" / "rbl.yaml").write_text(LISTS)
    (etc / "rules.d" / "rbl_test.yaml").write_text(RULES)
    return Engine.load(load_config(etc_dir=etc, sets=[f"dns.nameservers={nsd.address}", *sets]), strict=True)


@pytest.fixture(scope="module")
def engine(nsd, tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("rbl"), nsd)


def rbl_symbols(verdict) -> set[str]:
    return {s for s in verdict.symbols if s.startswith(("RBL_", "RHSBL_", "URIBL_"))}


def test_listed_client(engine):
    verdict, _ = scan(engine, message(), ip=LISTED, mail_from="a@example.test")
    assert rbl_symbols(verdict) == {"RBL_TEST_SPAM"}
    hit = verdict.hit("RBL_TEST_SPAM")
    assert hit.options == [LISTED] and "bl.test (127.0.0.2)" in hit.text and hit.stage.label == "mail_from"


def test_unlisted_client(engine):
    verdict, _ = scan(engine, message(), ip=CLEAN, mail_from="a@example.test")
    assert rbl_symbols(verdict) == set()


def test_code_range_maps_to_its_symbol(engine):
    verdict, _ = scan(engine, message(), ip="81.2.69.170", mail_from="a@example.test")
    assert rbl_symbols(verdict) == {"RBL_TEST_DYNAMIC"}


def test_blocked_resolver_answer_is_an_error_not_a_listing(engine):
    verdict, _ = scan(engine, message(), ip=BLOCKED, mail_from="a@example.test")
    assert rbl_symbols(verdict) == {"RBL_BLOCKED"}
    assert verdict.hit("RBL_BLOCKED").options == ["test_ip", "127.255.255.254"]
    body = "see http://refused.test/x\r\n"
    verdict, _ = scan(engine, message(body=body), ip=CLEAN, mail_from="a@example.test")
    assert rbl_symbols(verdict) == {"RBL_BLOCKED"}


def test_sender_and_from_domains(engine):
    raw = message(from_addr="news@mail.spammer.test")
    verdict, _ = scan(engine, raw, ip=CLEAN, mail_from="bounce@x.spammer.test")
    assert rbl_symbols(verdict) == {"RHSBL_TEST_SENDER", "RHSBL_TEST_FROM"}
    assert verdict.hit("RHSBL_TEST_SENDER").options == ["spammer.test"]


def test_uri_domains_bitmask_and_ips(engine):
    body = "Log in at https://www.login.bad.test/account or http://81.2.69.180/x\r\n"
    verdict, _ = scan(engine, message(body=body), ip=CLEAN, mail_from="a@example.test")
    assert rbl_symbols(verdict) == {"URIBL_TEST_PH", "URIBL_TEST_MW", "URIBL_TEST_IP"}
    assert verdict.hit("URIBL_TEST_PH").options == ["bad.test"]


def test_received_hops(engine):
    received = "Received: from relay (relay [81.2.69.180]) by mx.example.test; Mon, 2 Jan 2023 10:00:00 +0000\r\n"
    verdict, _ = scan(engine, message(extra=received), ip=CLEAN, mail_from="a@example.test")
    assert rbl_symbols(verdict) == {"RBL_TEST_RECEIVED"}


def test_own_and_skipped_domains_are_not_looked_up(nsd, tmp_path):
    engine = make_engine(tmp_path, nsd, "rbl.skip_domains=bad.test")
    body = "https://ours.test/a https://bad.test/b\r\n"
    # ours.test is the recipient's domain, bad.test is in rbl.skip_domains.
    from milterguard.model import Connection, Transaction
    from milterguard.mail.raw import split_message

    headers, raw_body = split_message(message(body=body, from_addr="a@mail.ours.test"))
    # (The recipients are not known yet at MAIL FROM: an envelope sender of ours is only spared by
    # rbl.skip_domains, so this one is elsewhere.)
    txn = Transaction(mail_from="a@elsewhere.test", rcpts=["bob@ours.test"], headers=headers, body=raw_body)
    verdict = engine.evaluate(Connection(client_ip=CLEAN, client_name=f"[{CLEAN}]", helo="h.example.test"), txn)
    assert rbl_symbols(verdict) == set()
    list_queries = [key[0] for key in txn.facts.dns.started if len(key) == 2
                    and key[0].endswith((".dbl.test", ".multi.test"))]
    assert list_queries and not any("ours.test" in name or name.startswith("bad.test") for name in list_queries)


def test_listing_with_fixed_action_rejects_early(nsd, tmp_path):
    engine = make_engine(tmp_path, nsd, "symbols.RBL_TEST_SPAM.action=reject")
    verdict, _ = scan(engine, message(), ip=LISTED, mail_from="a@example.test")
    assert verdict.action == Action.REJECT and verdict.stage.label == "mail_from"


def test_private_and_documentation_addresses_are_not_looked_up(engine):
    verdict, txn = scan(engine, message(), ip="192.0.2.10", mail_from="a@example.test")
    assert rbl_symbols(verdict) == set()


SPAMHAUS = {"spamhaus_zen", "spamhaus_dbl", "spamhaus_dbl_from"}


def test_spamhaus_is_on_by_default_and_the_other_public_lists_are_not(engine):
    from milterguard.checks.rbl import active_lists

    shipped = set(engine.config["rbl.lists"])
    assert SPAMHAUS | {"surbl", "uribl"} <= shipped
    assert SPAMHAUS <= set(active_lists(engine.config))
    assert not {"surbl", "uribl"} & set(active_lists(engine.config))
    off = engine.config.with_sets(["rbl.free_lists=false"])
    assert not SPAMHAUS & set(active_lists(off))
    assert SPAMHAUS | {"surbl", "uribl"} <= set(active_lists(off.with_sets(["rbl.public=true"])))


def test_spamhaus_listings_score_by_default(engine):
    body = "Sign in at https://secure.phish-kit.test/login\r\n"
    verdict, _ = scan(engine, message(body=body), ip=SPAMHAUS_LISTED, mail_from="a@example.test")
    assert rbl_symbols(verdict) == {"RBL_SPAMHAUS_SBL", "URIBL_SPAMHAUS_DBL_PHISH"}
    assert verdict.hit("URIBL_SPAMHAUS_DBL_PHISH").options == ["phish-kit.test"]
    assert verdict.hit("RBL_SPAMHAUS_SBL").weight > 0


def test_spamhaus_refusals_are_not_scored_and_logged_once_naming_the_resolver(engine, nsd, caplog):
    caplog.set_level("WARNING", logger="milterguard.rbl")
    for n in range(3):
        body = f"https://refused-kit.test/{n} https://as-ip.test/{n}\r\n"
        verdict, _ = scan(engine, message(body=body), ip=SPAMHAUS_REFUSED, mail_from="a@example.test")
        assert rbl_symbols(verdict) == {"RBL_BLOCKED"}
        assert verdict.hit("RBL_BLOCKED").options[:2] == ["spamhaus_zen", "127.255.255.254"]
        assert sum(h.weight for h in verdict.hits if h.symbol.startswith(("RBL_", "URIBL_"))) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "milterguard.rbl"]
    assert len([line for line in lines if "spamhaus_zen" in line]) == 1
    assert len([line for line in lines if "spamhaus_dbl " in line]) == 1
    zen = next(line for line in lines if "spamhaus_zen" in line)
    assert nsd.address in zen and "127.255.255.254" in zen and "public or open resolver" in zen
    assert "rbl.free_lists: false" in zen


def test_default_lists_without_a_network_log_the_outage_once(tmp_path, caplog):
    """Out of the box on a machine whose resolver never answers: mail is judged, one line says why."""
    from support.dns import silent_dns_server

    caplog.set_level("WARNING", logger="milterguard.dns")
    with silent_dns_server() as silent:
        engine = Engine.load(load_config(etc_dir=tmp_path, sets=[
            f"dns.nameservers={silent.address}", "dns.timeout=0.2", "dns.message_budget=0.5"]), strict=True)
        for n in range(4):
            verdict, _ = scan(engine, message(body=f"https://news.example.test/{n}\r\n"), ip=CLEAN,
                              mail_from="a@example.test")
            # Judged as without the lists: the outage neither holds nor refuses the message.
            assert verdict.action in (Action.ACCEPT, Action.TAG), [(h.symbol, h.weight) for h in verdict.hits]
            assert all(h.weight == 0 for h in verdict.hits if h.symbol.startswith("RBL_"))
            assert "RBL_TEMPFAIL" in verdict.symbols
    lines = [r.getMessage() for r in caplog.records if r.name == "milterguard.dns" and "unavailable" in r.getMessage()]
    assert len(lines) == 1 and silent.address in lines[0]


def test_a_list_symbol_no_rule_file_declares_stops_loading(nsd, tmp_path):
    from milterguard.engine.core import RulesError

    with pytest.raises(RulesError, match="RBL_UNDECLARED, which no rule file declares"):
        make_engine(tmp_path, nsd, "rbl.lists.extra={zone: x.test, kind: ip, symbol: RBL_UNDECLARED}")
