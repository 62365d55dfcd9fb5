"""DKIM against a real nsd: messages signed here with dkimpy, keys published in the zone."""

from __future__ import annotations

import io

import pytest

from milterguard.checks.dkim import DkimResult
from support.authmail import Key, engine_for, message, options, scan, sign
from support.dns import NsdServer, Zone, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))


@pytest.fixture(scope="module")
def keys():
    return {"good": Key.generate(), "other": Key.generate()}


@pytest.fixture(scope="module")
def nsd(tmp_path_factory, keys):
    z = Zone("dkim.test")
    z.txt("s1._domainkey", keys["good"].record)
    z.txt("s2._domainkey", keys["other"].record)
    z.txt("revoked._domainkey", "v=DKIM1; k=rsa; p=")
    z.txt("broken._domainkey", "v=DKIM1; k=rsa; p=bm90IGEga2V5")
    with NsdServer(tmp_path_factory.mktemp("nsd"), [z]) as server:
        yield server


@pytest.fixture(scope="module")
def engine(nsd, tmp_path_factory):
    return engine_for(tmp_path_factory.mktemp("cfg"), f"dns.nameservers={nsd.address}")


def dkim_symbols(verdict) -> set[str]:
    return {s for s in verdict.symbols if s.startswith("R_DKIM_")}


def test_valid_signature(engine, keys):
    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "s1", keys["good"])
    verdict, txn = scan(engine, raw, ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_ALLOW"}
    assert options(verdict, "R_DKIM_ALLOW") == ["dkim.test:s1"]
    found = txn.facts.dkim
    assert isinstance(found, DkimResult) and found.result == "pass" and found.passing_domains == ["dkim.test"]


def test_body_altered(engine, keys):
    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "s1", keys["good"])
    verdict, _ = scan(engine, raw.replace(b"minutes", b"MINUTES"), ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_REJECT"}
    assert "body hash" in verdict.hit("R_DKIM_REJECT").text


def test_header_altered(engine, keys):
    raw = sign(message(from_addr="a@dkim.test", subject="Minutes"), "dkim.test", "s1", keys["good"])
    verdict, _ = scan(engine, raw.replace(b"Subject: Minutes", b"Subject: Invoice"), ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_REJECT"}
    assert "headers were altered" in verdict.hit("R_DKIM_REJECT").text


def test_key_missing(engine, keys):
    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "nokey", keys["good"])
    verdict, txn = scan(engine, raw, ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_PERMFAIL"}
    assert "no key at nokey._domainkey.dkim.test" in verdict.hit("R_DKIM_PERMFAIL").text
    assert txn.facts.dkim.result == "permerror"


def test_key_revoked(engine, keys):
    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "revoked", keys["good"])
    verdict, _ = scan(engine, raw, ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_PERMFAIL"}
    assert "revoked" in verdict.hit("R_DKIM_PERMFAIL").text


def test_key_record_broken(engine, keys):
    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "broken", keys["good"])
    verdict, _ = scan(engine, raw, ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_PERMFAIL"}


def test_two_signatures_one_bad(engine, keys):
    # Signed by s1 with the right key, and by s2 with a key that is not the one published.
    raw = sign(sign(message(from_addr="a@dkim.test"), "dkim.test", "s1", keys["good"]), "dkim.test", "s2",
               keys["good"])
    verdict, txn = scan(engine, raw, ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_ALLOW", "R_DKIM_REJECT"}
    assert options(verdict, "R_DKIM_ALLOW") == ["dkim.test:s1"]
    assert options(verdict, "R_DKIM_REJECT") == ["dkim.test:s2"]
    assert txn.facts.dkim.result == "pass"


def test_no_signature(engine):
    verdict, txn = scan(engine, message(), ip=None)
    assert dkim_symbols(verdict) == {"R_DKIM_NA"}
    assert txn.facts.dkim.result == "none"


def test_spooled_body_and_lf_line_ends_verify(engine, keys):
    """The milter may hand the body over as a file; a stored message may have bare LF line ends."""
    from milterguard.model import Connection, Transaction
    from milterguard.mail.raw import split_message

    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "s1", keys["good"]).replace(b"\r\n", b"\n")
    headers, body = split_message(raw)
    spool = io.BytesIO(body)
    spool.seek(0, io.SEEK_END)
    txn = Transaction(mail_from="a@dkim.test", rcpts=["b@dest.test"], headers=headers, body=spool,
                      body_size=len(body))
    verdict = engine.evaluate(Connection(helo="x"), txn)
    assert dkim_symbols(verdict) == {"R_DKIM_ALLOW"}


def test_explain_names_selector_and_reason(engine, keys, tmp_path, capsys, nsd):
    from milterguard.cli import main

    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "revoked", keys["good"])
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    assert main(["scan", str(path), "--explain", "--set", f"dns.nameservers={nsd.address}"]) == 0
    out = capsys.readouterr().out
    assert "R_DKIM_PERMFAIL" in out and "dkim.test:revoked" in out and "key revoked" in out


def test_explain_shows_every_failing_signature(engine, keys):
    """Two signatures failing for different reasons: both keys and both reasons are shown, not the first only."""
    from milterguard.explain import explain_text

    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "revoked", keys["good"])
    raw = sign(raw, "dkim.test", "nokey", keys["good"])
    verdict, _ = scan(engine, raw, ip=None)
    hit = verdict.hit("R_DKIM_PERMFAIL")
    assert hit.options == ["dkim.test:nokey", "dkim.test:revoked"]
    assert hit.where == ("DKIM-Signature #1 (key nokey._domainkey.dkim.test), "
                         "#2 (key revoked._domainkey.dkim.test)")
    assert "#1 no key at nokey._domainkey.dkim.test" in hit.text and "#2 key revoked" in hit.text
    out = explain_text(verdict)
    assert "#1 no key at nokey._domainkey.dkim.test" in out and "#2 key revoked" in out


def test_thousands_of_signatures_cost_only_the_first_ten(engine, keys):
    """Each signature costs a parse of the message and a key lookup: 3,000 of them once took 27 s."""
    import time

    from milterguard.checks.dkim import MAX_SIGNATURES

    raw = sign(message(from_addr="a@dkim.test"), "dkim.test", "s1", keys["good"])
    junk = b"".join(b"DKIM-Signature: v=1; a=rsa-sha256; d=dkim.test; s=n%d; h=from; bh=AA==; b=AA==\r\n" % i
                    for i in range(3000))
    end = raw.index(b"\r\n\r\n") + 2
    t0 = time.perf_counter()
    verdict, txn = scan(engine, raw[:end] + junk + raw[end:], ip=None)
    elapsed = time.perf_counter() - t0
    found = txn.facts.dkim
    assert len(found.signatures) == MAX_SIGNATURES == 10
    assert found.signatures[0].result == "pass" and found.result == "pass"
    assert {s.result for s in found.signatures[1:]} == {"permerror"}
    assert elapsed < 3.0, f"{elapsed:.1f}s"
