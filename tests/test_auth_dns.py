"""The DNS layer against a real nsd: name server with a port, TTL cache (positive and
negative), bounded size, concurrency, and the per-message budget against a server that
never answers or is stopped mid-test."""

from __future__ import annotations

import logging
import time

import pytest

from milterguard.clients import dns_client as mgdns
from support.authmail import Key, engine_for, message, scan, sign
from support.dns import NsdServer, Zone, nsd_available, silent_dns_server

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))


@pytest.fixture(scope="module")
def nsd(tmp_path_factory):
    z = Zone("cache.test", ttl=300, negative_ttl=45)
    z.add("www", "A", "192.0.2.1")
    z.add("short", "A", "192.0.2.2", ttl=1)
    z.txt("txt", "v=spf1 -all")
    z.add("@", "MX", "10 mx.cache.test.")
    with NsdServer(tmp_path_factory.mktemp("nsd"), [z]) as server:
        yield server


def test_nameserver_notation():
    assert mgdns.parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert mgdns.parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert mgdns.parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert mgdns.parse_nameserver("::1") == ("::1", 53)
    with pytest.raises(ValueError):
        mgdns.parse_nameserver("ns.example.test")


def test_set_nameservers_with_port_reaches_the_server(nsd, tmp_path):
    engine = engine_for(tmp_path, f"dns.nameservers={nsd.address}")
    resolver = mgdns.resolver_for(engine.config)
    assert len(resolver.nameservers) == 1 and str(nsd.port) in resolver.nameservers[0]
    answer = resolver.lookup("www.cache.test", "A")
    assert answer.ok and answer.records == ["192.0.2.1"]
    assert resolver.lookup("cache.test", "MX").records == [(10, "mx.cache.test")]
    assert resolver.lookup("txt.cache.test", "TXT").texts() == ["v=spf1 -all"]


def test_positive_and_negative_answers_are_cached_for_their_ttl(nsd):
    resolver = mgdns.Resolver([nsd.address], timeout=2.0, cache_size=100)
    first = resolver.lookup("www.cache.test", "A")
    again = resolver.lookup("www.cache.test", "A")
    assert not first.cached and again.cached and resolver.queries == 1
    assert 290 <= again.ttl <= 300
    missing = resolver.lookup("nothing.cache.test", "A")
    assert missing.status == mgdns.NXDOMAIN and missing.ttl == 45  # min(SOA TTL, MINIMUM)
    assert resolver.lookup("nothing.cache.test", "A").cached and resolver.queries == 2
    nodata = resolver.lookup("www.cache.test", "TXT")
    assert nodata.status == mgdns.NODATA and resolver.lookup("www.cache.test", "TXT").cached
    # A one-second TTL: once it runs out, the next lookup asks the server again.
    resolver.lookup("short.cache.test", "A")
    assert resolver.lookup("short.cache.test", "A").cached
    queries = resolver.queries
    deadline = time.monotonic() + 5
    while resolver.lookup("short.cache.test", "A").cached and time.monotonic() < deadline:
        time.sleep(0.2)
    assert resolver.queries == queries + 1


def test_cache_is_bounded(nsd):
    resolver = mgdns.Resolver([nsd.address], timeout=2.0, cache_size=2)
    for name in ("www.cache.test", "txt.cache.test", "cache.test"):
        resolver.lookup(name, "A")
    assert len(resolver.cache) == 2
    assert not resolver.lookup("www.cache.test", "A").cached  # the oldest went first


def test_lookups_of_one_message_share_one_budget():
    """Ten lookups to a server that never answers cost one budget, not ten timeouts."""
    with silent_dns_server() as silent:
        resolver = mgdns.Resolver([silent.address], timeout=3.0, cache_size=100)
        sess = mgdns.Session(resolver, mgdns.Budget(0.5))
        t0 = time.monotonic()
        futures = [sess.start(f"n{i}.cache.test", "A") for i in range(10)]
        answers = [sess.get(f"n{i}.cache.test", "A") for i in range(10)]
        elapsed = time.monotonic() - t0
    assert all(a.status == mgdns.TIMEOUT for a in answers)
    assert 0.45 <= elapsed < 1.0
    assert len(futures) == 10


@pytest.fixture(scope="module")
def key():
    return Key.generate()


def auth_zone(key) -> Zone:
    z = Zone("slow.test")
    z.txt("@", "v=spf1 ip4:192.0.2.10 -all")
    z.txt("_dmarc", "v=DMARC1; p=reject")
    z.txt("s1._domainkey", key.record)
    return z


def test_silent_server_message_goes_on_within_budget_with_tempfail(tmp_path, key):
    with silent_dns_server() as silent:
        engine = engine_for(tmp_path, f"dns.nameservers={silent.address}", "dns.timeout=3",
                            "dns.message_budget=1")
        raw = sign(message(from_addr="a@slow.test"), "slow.test", "s1", key)
        t0 = time.monotonic()
        verdict, _ = scan(engine, raw, ip="192.0.2.10", mail_from="a@slow.test")
        elapsed = time.monotonic() - t0
    assert {"R_SPF_DNSFAIL", "R_DKIM_TEMPFAIL", "DMARC_TEMPFAIL"} <= set(verdict.symbols)
    assert elapsed < 1.5, f"took {elapsed:.2f}s for a budget of 1s"
    assert "budget" in verdict.hit("R_SPF_DNSFAIL").text


def test_waiting_for_dns_is_not_a_slow_check(tmp_path, key):
    # The wait is the DNS budget's to bound (and R_SPF_DNSFAIL's to report), not CHECK_SLOW's:
    # with a silent resolver every message would otherwise carry CHECK_SLOW and a warning.
    with silent_dns_server() as silent:
        engine = engine_for(tmp_path, f"dns.nameservers={silent.address}", "dns.timeout=3",
                            "dns.message_budget=1", "checks.check_budget=0.3")
        raw = sign(message(from_addr="a@slow.test"), "slow.test", "s1", key)
        verdict, txn = scan(engine, raw, ip="192.0.2.10", mail_from="a@slow.test")
    assert "R_SPF_DNSFAIL" in verdict.symbols
    assert txn.timings["spf"] > 0.3  # it did wait
    assert "CHECK_SLOW" not in verdict.symbols


def test_server_stopped_mid_test(tmp_path, key):
    server = NsdServer(tmp_path / "nsd", [auth_zone(key)]).start()
    try:
        engine = engine_for(tmp_path, f"dns.nameservers={server.address}", "dns.message_budget=2")
        raw = sign(message(from_addr="a@slow.test"), "slow.test", "s1", key)
        verdict, _ = scan(engine, raw, ip="192.0.2.10", mail_from="a@slow.test")
        assert {"R_SPF_ALLOW", "R_DKIM_ALLOW", "DMARC_POLICY_ALLOW"} <= set(verdict.symbols)
    finally:
        server.stop()
    # Answers already seen come from the cache; new names fail fast or within the budget.
    raw = sign(message(from_addr="a@sub.slow.test"), "sub.slow.test", "s2", key)
    t0 = time.monotonic()
    verdict, _ = scan(engine, raw, ip="192.0.2.10", mail_from="a@sub.slow.test")
    assert time.monotonic() - t0 < 2.5
    assert {"R_SPF_DNSFAIL", "R_DKIM_TEMPFAIL", "DMARC_TEMPFAIL"} <= set(verdict.symbols)


def test_a_message_already_refused_starts_no_lookups(nsd, tmp_path):
    """192.0.2.66 is in the shipped block map: refused at the first RCPT, so MAIL FROM starts nothing."""
    from milterguard.model import Connection, Stage, Transaction

    engine = engine_for(tmp_path, f"dns.nameservers={nsd.address}")
    conn = Connection(client_ip="192.0.2.66", client_name="[192.0.2.66]", helo="mail.cache.test")
    conn.hits = engine.new_hits()
    assert engine.run_stage(Stage.CONNECT, conn, None, conn.hits) is not None
    txn = Transaction(mail_from="a@cache.test")
    hits = engine.start_transaction(conn, txn)
    engine.run_stage(Stage.MAIL_FROM, conn, txn, hits)
    assert "spf" not in txn.facts.scratch and txn.facts.dns is None


def _dns_lines(caplog, word: str, server: str) -> list[str]:
    # Named by server: look-ups of earlier tests may still end while this one runs.
    return [r.getMessage() for r in caplog.records
            if r.name == "milterguard.dns" and word in r.getMessage() and f"{server} " in r.getMessage()]


def test_silent_dns_server_is_named_once_and_later_messages_do_not_wait(tmp_path, key, caplog):
    """Issue 11: with a server that never answers, every message waited its DNS time and the
    log did not name DNS.  Now the first message waits; the outage is logged once, with the
    server, and the messages after it get their *_TEMPFAIL symbols at once."""
    with silent_dns_server() as silent, caplog.at_level(logging.INFO, logger="milterguard.dns"):
        engine = engine_for(tmp_path, f"dns.nameservers={silent.address}", "dns.timeout=1",
                            "dns.message_budget=3")
        waits = []
        for n in range(6):
            raw = sign(message(from_addr=f"a@m{n}.slow.test"), f"m{n}.slow.test", "s1", key)
            t0 = time.monotonic()
            verdict, _ = scan(engine, raw, ip="192.0.2.10", mail_from=f"a@m{n}.slow.test")
            waits.append(time.monotonic() - t0)
            assert {"R_SPF_DNSFAIL", "R_DKIM_TEMPFAIL", "DMARC_TEMPFAIL"} <= set(verdict.symbols)
    assert waits[0] >= 0.9, waits  # the first one finds out
    assert max(waits[1:]) < 0.3, waits
    assert len(_dns_lines(caplog, "unavailable", silent.address)) == 1, caplog.text
    assert not _dns_lines(caplog, "back after", silent.address)


def test_dns_back_is_logged_once_with_the_count(tmp_path, key, caplog):
    server = NsdServer(tmp_path / "nsd", [auth_zone(key)]).start()
    try:
        with caplog.at_level(logging.INFO, logger="milterguard.dns"):
            engine = engine_for(tmp_path, f"dns.nameservers={server.address}", "dns.timeout=1",
                                "dns.message_budget=3")
            server.stop()
            for n in range(4):
                raw = message(from_addr=f"a@gone{n}.slow.test")
                verdict, _ = scan(engine, raw, ip="192.0.2.10")
                assert "R_SPF_DNSFAIL" in verdict.symbols
            assert len(_dns_lines(caplog, "unavailable", server.address)) == 1
            server.restart()
            deadline = time.monotonic() + 8  # back-off of 4 s at most, then a look-up that is answered
            n = 0
            while not _dns_lines(caplog, "back after", server.address) and time.monotonic() < deadline:
                scan(engine, message(from_addr=f"a@back{n}.slow.test"), ip="192.0.2.10")
                n += 1
                time.sleep(0.1)
            verdict, _ = scan(engine, message(from_addr="a@slow.test"), ip="192.0.2.10")
    finally:
        server.stop()
    back = _dns_lines(caplog, "back after", server.address)
    assert len(back) == 1 and "failed or were skipped" in back[0], caplog.text
    assert len(_dns_lines(caplog, "unavailable", server.address)) == 1
    assert "R_SPF_ALLOW" in verdict.symbols  # answered again
