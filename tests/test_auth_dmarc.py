"""DMARC and ARC against a real nsd: policies, alignment, subdomain policy, org-domain fallback,
and a forwarded message sealed by a (trusted or untrusted) ARC sealer."""

from __future__ import annotations

import logging
import re

import pytest

from milterguard.model import Action
from support.authmail import Key, arc_seal, engine_for, message, scan, sign
from support.dns import NsdServer, Zone, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

SENDER_IP = "192.0.2.10"  # the domains' own mail server
OTHER_IP = "198.51.100.99"  # anyone else (and the forwarder)


@pytest.fixture(scope="module")
def key():
    return Key.generate()


@pytest.fixture(scope="module")
def nsd(tmp_path_factory, key):
    zones = []
    for origin, policy in [
        ("rej.test", "v=DMARC1; p=reject; rua=mailto:reports@elsewhere.test"),
        ("quar.test", "v=DMARC1; p=quarantine"),
        ("none.test", "v=DMARC1; p=none"),
        ("strict.test", "v=DMARC1; p=reject; adkim=s; aspf=s"),
        ("sub.test", "v=DMARC1; p=reject; sp=quarantine"),
        ("pct.test", "v=DMARC1; p=reject; pct=0"),
        ("half.test", "v=DMARC1; p=reject; pct=50"),
        ("bad.test", "v=DMARC1; p=bogus"),
        ("nodmarc.test", None),
        ("other.test", None),
        ("fwd.test", None),
    ]:
        z = Zone(origin)
        if policy:
            z.txt("_dmarc", policy)
        for name in ("@", "mail", "x"):
            z.txt(name, f"v=spf1 ip4:{SENDER_IP} -all")
        z.txt("s1._domainkey", key.record)
        z.txt("s1._domainkey.mail", key.record)
        zones.append(z)
    with NsdServer(tmp_path_factory.mktemp("nsd"), zones) as server:
        yield server


@pytest.fixture(scope="module")
def engine(nsd, tmp_path_factory):
    return engine_for(tmp_path_factory.mktemp("cfg"), f"dns.nameservers={nsd.address}")


def dmarc_symbols(verdict) -> set[str]:
    return {s for s in verdict.symbols if s.startswith("DMARC_")}


def test_aligned_spf_passes(engine):
    verdict, txn = scan(engine, message(from_addr="a@rej.test"), ip=SENDER_IP, mail_from="a@rej.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_ALLOW"}
    found = txn.facts.dmarc
    assert (found.result, found.domain, found.policy) == ("pass", "rej.test", "reject")
    assert found.spf_aligned and not found.dkim_aligned


def test_reject_policy_reaches_review_but_not_reject(engine):
    verdict, txn = scan(engine, message(from_addr="a@rej.test"), ip=OTHER_IP, mail_from="a@rej.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_REJECT"}
    assert verdict.hit("DMARC_POLICY_REJECT").options == ["rej.test", "reject"]
    assert verdict.action == Action.REVIEW
    assert txn.facts.dmarc.result == "fail"
    assert "SPF fail for rej.test" in verdict.hit("DMARC_POLICY_REJECT").text


def test_reject_at_smtp_is_opt_in(nsd, tmp_path):
    engine = engine_for(tmp_path, f"dns.nameservers={nsd.address}", "symbols.DMARC_POLICY_REJECT.action=reject")
    verdict, _ = scan(engine, message(from_addr="a@rej.test"), ip=OTHER_IP, mail_from="a@rej.test")
    assert verdict.action == Action.REJECT and verdict.reason == "DMARC_POLICY_REJECT"


def test_unaligned_spf_pass_fails(engine):
    verdict, txn = scan(engine, message(from_addr="a@rej.test"), ip=SENDER_IP, mail_from="bounce@other.test")
    assert "R_SPF_ALLOW" in verdict.symbols
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_REJECT"}
    assert "SPF pass for other.test not aligned (relaxed)" in verdict.hit("DMARC_POLICY_REJECT").text


def test_explain_names_the_record_and_what_did_not_align(engine, key):
    """scan --explain shows the whole reason, not its first 100 characters."""
    from milterguard.explain import explain_text

    raw = sign(message(from_addr="a@strict.test"), "mail.strict.test", "s1", key)
    verdict, _ = scan(engine, raw, ip=SENDER_IP, mail_from="bounce@other.test")
    out = explain_text(verdict)
    assert "record at _dmarc.strict.test (p=reject, adkim=s, aspf=s)" in out
    assert "SPF pass for other.test not aligned (strict)" in out
    assert "DKIM d=mail.strict.test pass not aligned (strict)" in out


def test_dkim_of_subdomain_aligns_relaxed_not_strict(engine, key):
    raw = sign(message(from_addr="a@rej.test"), "mail.rej.test", "s1", key)
    verdict, txn = scan(engine, raw, ip=OTHER_IP, mail_from="bounce@other.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_ALLOW"} and txn.facts.dmarc.dkim_aligned
    raw = sign(message(from_addr="a@strict.test"), "mail.strict.test", "s1", key)
    verdict, _ = scan(engine, raw, ip=OTHER_IP, mail_from="bounce@other.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_REJECT"}
    assert "DKIM d=mail.strict.test pass not aligned (strict)" in verdict.hit("DMARC_POLICY_REJECT").text


def test_quarantine_and_none(engine):
    verdict, _ = scan(engine, message(from_addr="a@quar.test"), ip=OTHER_IP, mail_from="a@quar.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_QUARANTINE"}
    verdict, txn = scan(engine, message(from_addr="a@none.test"), ip=OTHER_IP, mail_from="a@none.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_SOFTFAIL"}
    assert txn.facts.dmarc.policy == "none"


def test_subdomain_policy_from_the_organisational_domain(engine):
    verdict, txn = scan(engine, message(from_addr="a@x.sub.test"), ip=OTHER_IP, mail_from="a@x.sub.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_QUARANTINE"}
    found = txn.facts.dmarc
    assert (found.domain, found.record_domain, found.policy) == ("x.sub.test", "sub.test", "quarantine")
    assert "record at _dmarc.sub.test" in verdict.hit("DMARC_POLICY_QUARANTINE").text


def test_org_domain_fallback_takes_p_without_sp(engine):
    verdict, txn = scan(engine, message(from_addr="a@deep.x.rej.test"), ip=OTHER_IP, mail_from="a@deep.x.rej.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_REJECT"}
    assert txn.facts.dmarc.record_domain == "rej.test"


def test_pct_zero_applies_the_next_milder_policy(engine):
    verdict, txn = scan(engine, message(from_addr="a@pct.test"), ip=OTHER_IP, mail_from="a@pct.test")
    assert dmarc_symbols(verdict) == {"DMARC_POLICY_QUARANTINE"}
    assert txn.facts.dmarc.policy == "reject" and txn.facts.dmarc.applied == "quarantine"


def with_message_id(raw: bytes, mid: str | None) -> bytes:
    """RAW with its Message-ID set to MID, or removed for None."""
    return re.sub(rb"Message-ID: <[^>]*>\r\n", f"Message-ID: <{mid}>\r\n".encode() if mid else b"", raw)


def test_pct_50_samples_by_message_not_by_chance(engine):
    """pct=50: about half of the failing messages get p=reject, the others quarantine; which
    ones is decided by the Message-ID, so a message tried again is judged alike."""
    first = {}
    for i in range(40):
        raw = with_message_id(message(from_addr="a@half.test"), f"order-{i}.{i * 7919}@half.test")
        verdict, txn = scan(engine, raw, ip=OTHER_IP, mail_from="a@half.test")
        found = txn.facts.dmarc
        assert 0 <= found.sample < 100
        assert dmarc_symbols(verdict) == {"DMARC_POLICY_REJECT" if found.sample < 50 else "DMARC_POLICY_QUARANTINE"}
        assert f"pct=50, sample {found.sample}: " in verdict.hit(next(iter(dmarc_symbols(verdict)))).text
        first[raw] = found.applied
    assert 12 <= list(first.values()).count("reject") <= 28, first.values()
    for raw, applied in list(first.items())[:10]:
        # Tried again later, through another relay: other trace headers, the same Message-ID.
        again = b"Received: from relay.other.test ([198.51.100.98]) by mx.dest.test; Mon, 02 Jan 2023 11:00:00 +0000\r\n"
        _, txn = scan(engine, again + raw, ip="198.51.100.98", mail_from="a@half.test")
        assert txn.facts.dmarc.applied == applied


def test_pct_sample_without_message_id_comes_from_the_headers(engine):
    raw = with_message_id(message(from_addr="a@half.test", subject="Invoice 42"), None)
    assert b"Message-ID" not in raw
    samples = {scan(engine, raw, ip=OTHER_IP, mail_from="a@half.test")[1].facts.dmarc.sample for _ in range(3)}
    assert len(samples) == 1
    others = {scan(engine, with_message_id(message(from_addr="a@half.test", subject=f"Invoice {n}"), None),
                   ip=OTHER_IP, mail_from="a@half.test")[1].facts.dmarc.sample for n in range(43, 53)}
    assert len(others) > 3  # the Subject is part of the key


def test_no_record_and_broken_record(engine):
    verdict, txn = scan(engine, message(from_addr="a@nodmarc.test"), ip=OTHER_IP, mail_from="a@nodmarc.test")
    assert dmarc_symbols(verdict) == {"DMARC_NA"} and txn.facts.dmarc.result == "none"
    verdict, txn = scan(engine, message(from_addr="a@bad.test"), ip=OTHER_IP, mail_from="a@bad.test")
    assert dmarc_symbols(verdict) == {"DMARC_BAD_POLICY"} and txn.facts.dmarc.result == "permerror"


def forwarded(key) -> bytes:
    """Signed by rej.test, altered by a mailing list at fwd.test (footer), then ARC-sealed by it."""
    raw = sign(message(from_addr="a@rej.test"), "rej.test", "s1", key)
    raw += b"-- \r\nlist footer\r\n"
    return arc_seal(raw, "fwd.test", "s1", key, "dkim=pass header.d=rej.test; spf=pass smtp.mailfrom=a@rej.test")


def test_forwarded_with_untrusted_arc_still_fails_dmarc(engine, key):
    verdict, txn = scan(engine, forwarded(key), ip=OTHER_IP, mail_from="a@rej.test")
    assert {"ARC_ALLOW", "R_DKIM_REJECT", "R_SPF_FAIL", "DMARC_POLICY_REJECT"} <= set(verdict.symbols)
    assert txn.facts.arc.sealer == "fwd.test" and not txn.facts.arc.trusted
    assert "DKIM d=rej.test s=s1 fail" in verdict.hit("DMARC_POLICY_REJECT").text


def test_forwarded_with_trusted_arc_sealer_is_not_punished(nsd, tmp_path, key):
    engine = engine_for(tmp_path, f"dns.nameservers={nsd.address}", "auth.trusted_arc_sealers=fwd.test")
    verdict, txn = scan(engine, forwarded(key), ip=OTHER_IP, mail_from="a@rej.test")
    assert "ARC_ALLOW" in verdict.symbols
    assert dmarc_symbols(verdict) == {"DMARC_ARC_OVERRIDE"}
    assert txn.facts.dmarc.result == "fail" and txn.facts.dmarc.override == "arc:fwd.test"
    assert verdict.action == Action.ACCEPT


def test_arc_chain_broken_after_sealing(engine, key):
    raw = forwarded(key).replace(b"list footer", b"list fooTer")
    verdict, txn = scan(engine, raw, ip=OTHER_IP, mail_from="a@rej.test")
    assert "ARC_REJECT" in verdict.symbols and txn.facts.arc.result == "fail"


def test_no_arc(engine):
    verdict, _ = scan(engine, message(from_addr="a@rej.test"), ip=SENDER_IP, mail_from="a@rej.test")
    assert "ARC_NA" in verdict.symbols


def test_broken_arc_set_is_a_reason_not_an_error_logged(engine, key, caplog):
    """dkimpy logs what it finds wrong with an ARC set as an error of its own logger,
    which landed in milterguard's log without a queue id for every such message."""
    raw = forwarded(key)
    seal = re.search(rb"^ARC-Seal:.*?\r\n(?![ \t])", raw, re.M | re.S).group(0)
    with caplog.at_level("INFO"):
        verdict, txn = scan(engine, seal + raw, ip=OTHER_IP, mail_from="a@rej.test")
    assert "ARC_REJECT" in verdict.symbols
    assert "Duplicate ARC-Seal for instance 1" in txn.facts.arc.reason
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
