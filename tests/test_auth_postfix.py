"""Sender authentication end to end: Postfix -> milterguard -> sink, with nsd answering.

XCLIENT makes Postfix (and so the milter) see a remote client while the
connection stays on loopback.
"""

from __future__ import annotations

import re
import time

import pytest

from support.authmail import Key, message, sign
from support.dns import NsdServer, Zone, nsd_available, silent_dns_server

pytestmark = [pytest.mark.postfix, pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))]

AUTHSERV = "mx.dest.test"
CLIENT = {"ADDR": "192.0.2.10", "NAME": "mail.example.test"}


@pytest.fixture(scope="module")
def key():
    return Key.generate()


@pytest.fixture
def nsd(tmp_path, key):
    z = Zone("example.test")
    z.txt("@", "v=spf1 ip4:192.0.2.10 -all")
    z.txt("_dmarc", "v=DMARC1; p=reject")
    z.txt("s1._domainkey", key.record)
    with NsdServer(tmp_path / "nsd", [z]) as server:
        yield server


def auth_results(got) -> list[str]:
    return [" ".join(v.split()) for v in got.message.get_all("Authentication-Results") or []]


def test_delivered_message_carries_our_authentication_results(nsd, key, postfix_factory, milterguard_factory, sink):
    mg = milterguard_factory(workers=1, sets={"dns.nameservers": nsd.address, "auth.authserv_id": AUTHSERV})
    pf = postfix_factory(mg)
    forged = f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=bank.test; dmarc=pass header.from=bank.test\r\n"
    upstream = "Authentication-Results: mx.elsewhere.test; spf=pass smtp.mailfrom=a@example.test\r\n"
    raw = sign(message(from_addr="alice@example.test", to="bob@dest.test", extra=forged + upstream),
               "example.test", "s1", key)
    msgid = re.search(rb"Message-ID: <([^>]+)>", raw).group(1).decode()
    assert pf.send(raw, sender="alice@example.test", rcpts=["bob@dest.test"], xclient=CLIENT).code == 250
    got = sink.wait_for_message_id(f"<{msgid}>")
    results = auth_results(got)
    ours = [r for r in results if r.startswith(AUTHSERV + ";")]
    assert len(ours) == 1, results
    assert "spf=pass (client 192.0.2.10) smtp.mailfrom=alice@example.test" in ours[0]
    assert "dkim=pass header.d=example.test header.s=s1" in ours[0]
    assert "dmarc=pass (p=reject applied none) header.from=example.test" in ours[0]
    assert "bank.test" not in " ".join(results)  # the forged one is gone
    assert any(r.startswith("mx.elsewhere.test;") for r in results)  # another host's is kept
    # Ours goes on top (RFC 8601 5), above the Received header Postfix added.
    names = [line.split(b":", 1)[0].lower() for line in got.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
             if line and line[:1] not in (b" ", b"\t")]
    assert names.index(b"authentication-results") < names.index(b"received")
    verdict = mg.verdict_for(msgid)
    assert {"R_SPF_ALLOW", "R_DKIM_ALLOW", "DMARC_POLICY_ALLOW", "AUTH_RESULTS_FORGED"} <= set(verdict.symbols)


def test_dns_that_never_answers_delays_delivery_by_one_budget(key, postfix_factory, milterguard_factory, sink):
    with silent_dns_server() as silent:
        mg = milterguard_factory(workers=1, sets={"dns.nameservers": silent.address, "dns.timeout": 3,
                                                  "dns.message_budget": 1, "auth.authserv_id": AUTHSERV})
        pf = postfix_factory(mg)
        raw = sign(message(from_addr="alice@example.test", to="bob@dest.test"), "example.test", "s1", key)
        msgid = re.search(rb"Message-ID: <([^>]+)>", raw).group(1).decode()
        t0 = time.monotonic()
        assert pf.send(raw, sender="alice@example.test", rcpts=["bob@dest.test"], xclient=CLIENT).code == 250
        elapsed = time.monotonic() - t0
        got = sink.wait_for_message_id(f"<{msgid}>")
    assert elapsed < 2.5, f"the SMTP transaction took {elapsed:.2f}s for a DNS budget of 1s"
    verdict = mg.verdict_for(msgid)
    assert {"R_SPF_DNSFAIL", "R_DKIM_TEMPFAIL", "DMARC_TEMPFAIL"} <= set(verdict.symbols)
    ours = [r for r in auth_results(got) if r.startswith(AUTHSERV + ";")]
    assert ours and "spf=temperror" in ours[0] and "dkim=temperror" in ours[0] and "dmarc=temperror" in ours[0]
