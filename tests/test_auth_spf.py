"""SPF against a real nsd serving generated zones."""

from __future__ import annotations

import pytest

from support.authmail import engine_for, message, scan
from support.dns import NsdServer, Zone, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

CLIENT = "192.0.2.10"


def spf_zone() -> Zone:
    z = Zone("spf.test")
    z.txt("pass", f"v=spf1 ip4:{CLIENT} -all")
    z.txt("fail", "v=spf1 ip4:198.51.100.1 -all")
    z.txt("soft", "v=spf1 ip4:198.51.100.1 ~all")
    z.txt("neutral", "v=spf1 ?all")
    z.add("nospf", "A", "198.51.100.7")
    z.txt("incl", "v=spf1 include:inner.spf.test -all")
    z.txt("inner", "v=spf1 ip4:192.0.2.0/24 -all")
    z.txt("redir", "v=spf1 redirect=pass.spf.test")
    # RFC 7208 4.6.4: more than two lookups that find nothing is a permerror.
    z.txt("void", "v=spf1 a:v1.spf.test a:v2.spf.test a:v3.spf.test -all")
    z.txt("loop", "v=spf1 include:loop2.spf.test -all")
    z.txt("loop2", "v=spf1 include:loop.spf.test -all")
    z.txt("syntax", "v=spf1 ip4:192.0.2.300 -all")
    z.txt("helo", f"v=spf1 ip4:{CLIENT} -all")
    z.txt("relayed", "v=spf1 ip4:203.0.113.5 -all")
    z.txt("short", f"v=spf1 include:inner.spf.test -all", ttl=1)
    return z


@pytest.fixture(scope="module")
def nsd(tmp_path_factory):
    with NsdServer(tmp_path_factory.mktemp("nsd"), [spf_zone()]) as server:
        yield server


@pytest.fixture(scope="module")
def engine(nsd, tmp_path_factory):
    return engine_for(tmp_path_factory.mktemp("cfg"), f"dns.nameservers={nsd.address}")


@pytest.mark.parametrize("domain, symbol", [
    ("pass.spf.test", "R_SPF_ALLOW"),
    ("fail.spf.test", "R_SPF_FAIL"),
    ("soft.spf.test", "R_SPF_SOFTFAIL"),
    ("neutral.spf.test", "R_SPF_NEUTRAL"),
    ("nospf.spf.test", "R_SPF_NA"),
    ("incl.spf.test", "R_SPF_ALLOW"),
    ("redir.spf.test", "R_SPF_ALLOW"),
    ("void.spf.test", "R_SPF_PERMFAIL"),
    ("loop.spf.test", "R_SPF_PERMFAIL"),
    ("syntax.spf.test", "R_SPF_PERMFAIL"),
])
def test_spf_result(engine, domain, symbol):
    verdict, txn = scan(engine, message(), ip=CLIENT, mail_from=f"alice@{domain}")
    spf_symbols = {s for s in verdict.symbols if s.startswith("R_SPF_")}
    assert spf_symbols == {symbol}, verdict.hit(next(iter(spf_symbols))).text if spf_symbols else "no SPF symbol"
    assert txn.facts.spf.domain == domain
    assert verdict.hit(symbol).options == [domain, CLIENT]


def test_a_result_is_remembered_for_the_shortest_ttl_it_was_made_from(engine, monkeypatch):
    import time

    from milterguard.checks import spf

    evaluations = []
    real = spf._evaluate
    monkeypatch.setattr(spf, "_evaluate", lambda *a: evaluations.append(a[1:3]) or real(*a))
    verdict, _ = scan(engine, message(), ip=CLIENT, mail_from="alice@short.spf.test")
    assert "R_SPF_ALLOW" in verdict.symbols and len(evaluations) == 1
    verdict, _ = scan(engine, message(), ip=CLIENT, mail_from="alice@short.spf.test")
    assert "R_SPF_ALLOW" in verdict.symbols and "matched include:inner.spf.test" in verdict.hit("R_SPF_ALLOW").text
    assert len(evaluations) == 1  # judged from memory
    # Another client address is judged afresh, and fails.
    verdict, _ = scan(engine, message(), ip="198.51.100.99", mail_from="alice@short.spf.test")
    assert "R_SPF_FAIL" in verdict.symbols and len(evaluations) == 2
    # The outer record's TTL is 1 s: after it, the result is made again from DNS.
    time.sleep(1.2)
    verdict, _ = scan(engine, message(), ip=CLIENT, mail_from="alice@short.spf.test")
    assert "R_SPF_ALLOW" in verdict.symbols and len(evaluations) == 3


def test_temporary_errors_are_not_remembered(tmp_path):
    from milterguard.clients import dns_client as mgdns
    from support.dns import silent_dns_server

    with silent_dns_server() as silent:
        eng = engine_for(tmp_path, f"dns.nameservers={silent.address}", "dns.timeout=0.3",
                         "dns.message_budget=0.5")
        verdict, _ = scan(eng, message(), ip=CLIENT, mail_from="alice@pass.spf.test")
        assert "R_SPF_DNSFAIL" in verdict.symbols
        assert len(mgdns.resolver_for(eng.config).memo) == 0


def test_explain_text_names_the_deciding_term(engine):
    verdict, _ = scan(engine, message(), ip=CLIENT, mail_from="alice@fail.spf.test")
    assert "matched -all" in verdict.hit("R_SPF_FAIL").text
    verdict, _ = scan(engine, message(), ip=CLIENT, mail_from="alice@incl.spf.test")
    assert "matched include:inner.spf.test" in verdict.hit("R_SPF_ALLOW").text


def test_permerror_says_why(engine):
    verdict, _ = scan(engine, message(), ip=CLIENT, mail_from="alice@void.spf.test")
    assert "void" in verdict.hit("R_SPF_PERMFAIL").text.lower()


def test_null_sender_is_judged_by_helo(engine):
    verdict, txn = scan(engine, message(), ip=CLIENT, mail_from="", helo="helo.spf.test")
    assert "R_SPF_ALLOW" in verdict.symbols
    assert txn.facts.spf.identity == "helo" and txn.facts.spf.domain == "helo.spf.test"


def test_trusted_relay_judges_the_hop_before_it(nsd, tmp_path):
    relay = "10.1.2.3"
    engine = engine_for(tmp_path, f"dns.nameservers={nsd.address}", "auth.trusted_relays=10.0.0.0/8")
    received = ("Received: from fwd.example (fwd.example [10.1.2.3]) by mx.dest.test; Mon, 2 Jan 2023 10:00:02 +0000\r\n"
                "Received: from origin.relayed.spf.test (origin [203.0.113.5]) by fwd.example; "
                "Mon, 2 Jan 2023 10:00:01 +0000\r\n")
    verdict, txn = scan(engine, message(extra=received), ip=relay, mail_from="alice@relayed.spf.test")
    assert "R_SPF_ALLOW" in verdict.symbols
    assert txn.facts.spf.ip == "203.0.113.5" and txn.facts.spf.via_relay
    # Without the relay setting, the relay itself is judged, and fails.
    verdict, _ = scan(engine_for(tmp_path, f"dns.nameservers={nsd.address}"), message(extra=received), ip=relay,
                      mail_from="alice@relayed.spf.test")
    assert "R_SPF_FAIL" in verdict.symbols


def test_authenticated_and_local_clients_are_not_judged(engine):
    verdict, txn = scan(engine, message(), ip=None, mail_from="alice@fail.spf.test")
    assert not any(s.startswith("R_SPF_") for s in verdict.symbols)
