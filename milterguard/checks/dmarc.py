"""DMARC (RFC 7489): the From domain's policy, and whether SPF or DKIM align with it.

The record of the From domain and that of its organisational domain (the
fallback of RFC 7489 6.6.3) are both looked up from end of headers on;
checkdmarc parses the record.  The public suffix list that decides the
organisational domain ships with the publicsuffixlist package: nothing is
fetched at run time.
"""

from __future__ import annotations

import hashlib
import re

from milterguard.checks import authshared as auth
from milterguard.mail.domains import org_domain
from milterguard.clients import dns_client as mgdns
from milterguard.checks.dkim import tags as record_tags
from milterguard.checks.registry import check, starter
from milterguard.model import DmarcResult, Hits, Stage

SYMBOLS = ("DMARC_POLICY_ALLOW", "DMARC_POLICY_REJECT", "DMARC_POLICY_QUARANTINE", "DMARC_POLICY_SOFTFAIL",
           "DMARC_NA", "DMARC_BAD_POLICY", "DMARC_TEMPFAIL", "DMARC_ARC_OVERRIDE")


def _from_domain(scan) -> str:
    msg = scan.message
    return msg.from_domain if msg is not None else ""


@starter("dmarc", Stage.HEADERS)
def _start(scan) -> None:
    if not auth.active(scan):
        return
    domain = _from_domain(scan)
    if not domain:
        return
    sess = mgdns.session(scan)
    sess.start(f"_dmarc.{domain}", "TXT")
    org = org_domain(domain)
    if org != domain:
        sess.start(f"_dmarc.{org}", "TXT")


def _records(answer: mgdns.Answer) -> list[str]:
    return [t for t in answer.texts() if re.match(r"v\s*=\s*DMARC1\b", t.strip(), re.I)]


def _fetch(sess: mgdns.Session, domain: str) -> tuple[str, str, str]:
    """(status, record, where): status ok, none or temperror (RFC 7489 6.6.3)."""
    org = org_domain(domain)
    for name in dict.fromkeys((domain, org)):
        answer = sess.get(f"_dmarc.{name}", "TXT")
        if answer.temporary:
            return "temperror", answer.error or answer.status, name
        found = _records(answer)
        if len(found) == 1:
            return "ok", found[0], name
        # No record, or several (which counts as none): try the organisational domain.
    return "none", "", domain


def pct_sample(message) -> int:
    """Where MESSAGE falls for a DMARC pct=, 0 to 99: the policy applies when it is below pct.

    Drawn from a hash of the Message-ID (or, without one, of From, To, Date and
    Subject), not at random: a message that is tried again, or scanned again,
    gets the same answer.
    """
    key = message.message_id if message is not None else ""
    if not key and message is not None:
        key = "\n".join(message.header(name) or "" for name in ("From", "To", "Date", "Subject"))
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % 100


@check(stage=Stage.EOM, emits=SYMBOLS, after=("spf", "dkim", "arc"), priority=45, active=mgdns.enabled)
def dmarc(scan, hits: Hits) -> None:
    """The From domain's DMARC policy against aligned SPF and DKIM results."""
    if not auth.active(scan):
        return
    txn = scan.txn
    domain = _from_domain(scan)
    if not domain:
        return
    sess = mgdns.session(scan)
    status, record, where = _fetch(sess, domain)
    if status == "temperror":
        txn.facts.dmarc = DmarcResult("temperror", domain, reason=record)
        hits.add("DMARC_TEMPFAIL", domain, where=f"_dmarc.{where}", text=record)
        return
    if status == "none":
        txn.facts.dmarc = DmarcResult("none", domain, reason="no record")
        hits.add("DMARC_NA", domain, where="_dmarc." + domain, text="no DMARC record")
        return
    # Report addresses are not used, and checking them would query DNS: leave them out.
    bare = ";".join(p for p in record.split(";") if not re.match(r"\s*ru[af]\s*=", p, re.I))
    # Imported at the first record, not with the checks: the checkdmarc package brings
    # BIMI, MTA-STS and DNSSEC support along (0.3 s of CPU at every start of a command).
    from checkdmarc.dmarc import DMARCError, parse_dmarc_record

    try:
        parsed = parse_dmarc_record(bare, where)["tags"]
    except DMARCError as exc:
        txn.facts.dmarc = DmarcResult("permerror", domain, record_domain=where, reason=str(exc))
        hits.add("DMARC_BAD_POLICY", domain, where=f"_dmarc.{where}", text=f"{record}: {exc}")
        return
    value = {k: str(v["value"]).lower() for k, v in parsed.items() if not isinstance(v["value"], list)}
    raw = record_tags(record)
    policy = value.get("p", "none") if where == domain else value.get("sp", value.get("p", "none"))
    adkim, aspf = value.get("adkim", "r"), value.get("aspf", "r")

    spf = txn.facts.spf
    dkim = txn.facts.dkim
    spf_aligned = bool(spf and spf.result == "pass" and auth.aligned(spf.domain, domain, aspf))
    dkim_domains = dkim.passing_domains if dkim else []
    dkim_aligned = any(auth.aligned(d, domain, adkim) for d in dkim_domains)
    mode = {"r": "relaxed", "s": "strict"}
    reasons = [f"record at _dmarc.{where} (p={value.get('p', 'none')}"
               + (f", sp={value['sp']}" if "sp" in raw else "") + f", adkim={adkim}, aspf={aspf})"]
    if spf is None:
        reasons.append("SPF not evaluated")
    elif spf.result != "pass":
        reasons.append(f"SPF {spf.result} for {spf.domain}")
    else:
        reasons.append(f"SPF pass for {spf.domain} " + ("aligned" if spf_aligned else f"not aligned ({mode[aspf]})"))
    if not dkim or not dkim.signatures:
        reasons.append("no DKIM signature")
    else:
        for sig in dkim.signatures:
            if sig.result != "pass":
                # The selector too, so that the key that failed can be looked at.
                reasons.append(f"DKIM d={sig.domain} s={sig.selector} {sig.result}")
            else:
                ok = auth.aligned(sig.domain, domain, adkim)
                reasons.append(f"DKIM d={sig.domain} pass " + ("aligned" if ok else f"not aligned ({mode[adkim]})"))
    reason = "; ".join(reasons)
    found = DmarcResult("pass" if spf_aligned or dkim_aligned else "fail", domain, policy, where,
                        spf_aligned, dkim_aligned, reason=reason)
    txn.facts.dmarc = found
    if found.result == "pass":
        found.applied = "none"
        hits.add("DMARC_POLICY_ALLOW", domain, policy, where=f"_dmarc.{where}", text=reason)
        return

    # RFC 7489 6.6.4: a policy applies to pct% of failing mail, the rest gets the next milder one;
    # DMARCbis t=y (testing) applies none of it.
    applied = policy
    try:
        pct = int(raw.get("pct", "100"))
    except ValueError:
        pct = 100
    if raw.get("t") == "y":
        pct = 0
    if policy in ("reject", "quarantine") and pct < 100:
        found.sample = pct_sample(scan.message)
        if found.sample >= pct:
            applied = "quarantine" if policy == "reject" else "none"
            reason += f"; pct={pct}, sample {found.sample}: {applied} instead of {policy}"
        else:
            reason += f"; pct={pct}, sample {found.sample}: {policy} applied"
    found.applied = applied
    arc = txn.facts.arc
    if arc is not None and arc.result == "pass" and arc.trusted:
        found.override = f"arc:{arc.sealer}"
        hits.add("DMARC_ARC_OVERRIDE", domain, arc.sealer, where=f"_dmarc.{where}",
                 text=f"{reason}; ARC chain sealed by trusted {arc.sealer}")
        return
    symbol = {"reject": "DMARC_POLICY_REJECT", "quarantine": "DMARC_POLICY_QUARANTINE"}.get(applied,
                                                                                           "DMARC_POLICY_SOFTFAIL")
    hits.add(symbol, domain, policy, where=f"_dmarc.{where}", text=reason)
