"""SPF (RFC 7208) with pyspf, through our resolver.

The evaluation starts at MAIL FROM (at end of headers when the client is a
trusted relay, since only the Received headers name the hop to judge) and
runs in the DNS pool while the MTA goes on; the check collects it at end of
headers within the message's DNS budget.  The identity is MAIL FROM, or
postmaster@HELO for the null sender (RFC 7208 2.4).

A result is a function of the client address, the sender, HELO and the DNS
answers consulted, so it is remembered (`Resolver.memo`) for as long as the
shortest TTL among those answers: a burst from one sender and address is
judged once, not once per message.  Temporary errors are not remembered.
"""

from __future__ import annotations

import threading

import spf as pyspf

from milterguard.checks import authshared as auth
from milterguard.clients import dns_client as mgdns
from milterguard.checks.registry import check, starter
from milterguard.model import Hits, SpfResult, Stage

SYMBOLS = {
    "pass": "R_SPF_ALLOW",
    "fail": "R_SPF_FAIL",
    "softfail": "R_SPF_SOFTFAIL",
    "neutral": "R_SPF_NEUTRAL",
    "none": "R_SPF_NA",
    "permerror": "R_SPF_PERMFAIL",
    "temperror": "R_SPF_DNSFAIL",
}

# pyspf looks its DNS up through a module-level function; point it at the resolver of
# the evaluation running in this thread (our pool runs one evaluation per thread).
_local = threading.local()
_original_lookup = pyspf.DNSLookup


def _lookup(name, qtype, tcpfallback=True, timeout=30):
    resolver = getattr(_local, "resolver", None)
    if resolver is None:
        return _original_lookup(name, qtype, tcpfallback, timeout)
    answer = resolver.lookup(name, qtype)
    _local.ttl = min(_local.ttl, answer.ttl)
    if answer.temporary:
        raise pyspf.TempError(f"DNS {answer.status} for {name} {qtype}: {answer.error}".rstrip(": "))
    if not answer.ok:
        return []
    if qtype == "MX":
        return [((name, qtype), (pref, host)) for pref, host in answer.records]
    return [((name, qtype), rec) for rec in answer.records]


pyspf.DNSLookup = _lookup


def _memo_key(ip: str, sender: str, helo: str) -> tuple:
    return ("spf", ip, sender, helo)


def _evaluate(resolver: mgdns.Resolver, ip: str, sender: str, helo: str, timeout: float, querytime: float):
    _local.resolver = resolver
    _local.ttl = float("inf")
    try:
        query = pyspf.query(i=ip, s=sender, h=helo, timeout=timeout, querytime=querytime)
        result, _code, explanation = query.check()
        mechanism = getattr(query, "mechanism", "") or ""
        if mechanism and result in ("pass", "fail", "softfail", "neutral"):
            # Which term of the record decided, for scan --explain.
            explanation = f"{explanation} (matched {mechanism})" if explanation else f"matched {mechanism}"
        if result != "temperror" and _local.ttl != float("inf"):
            resolver.memo.put(_memo_key(ip, sender, helo), (result, explanation), _local.ttl)
        return result, explanation
    finally:
        _local.resolver = None


def _identity(scan) -> tuple[str, str, str]:
    """(identity, sender address, domain)."""
    mail_from = scan.txn.mail_from if scan.txn is not None else ""
    helo = scan.conn.helo.strip().strip("[]")
    if mail_from and "@" in mail_from:
        return "mailfrom", mail_from, mail_from.rpartition("@")[2].lower()
    return "helo", f"postmaster@{helo}", helo.lower()


def _start(scan) -> None:
    if not auth.active(scan) or scan.txn is None or "spf" in scan.txn.facts.scratch:
        return
    ip, via_relay = auth.spf_hop(scan)
    if ip is None:
        return
    identity, sender, domain = _identity(scan)
    if not domain or "." not in domain:
        return
    sess = mgdns.session(scan)
    cfg = scan.config
    known = sess.resolver.memo.get(_memo_key(ip, sender, scan.conn.helo))
    if known is not None:
        future = mgdns.Done(known)
    else:
        future = sess.start_call(("spf", ip, sender), _evaluate, sess.resolver, ip, sender, scan.conn.helo,
                                 cfg["dns.timeout"], cfg["dns.message_budget"])
    scan.txn.facts.scratch["spf"] = (future, identity, sender, domain, ip, via_relay)


starter("spf", Stage.MAIL_FROM)(_start)
starter("spf", Stage.HEADERS)(_start)


@check(stage=Stage.HEADERS, emits=tuple(SYMBOLS.values()), priority=20, active=mgdns.enabled)
def spf(scan, hits: Hits) -> None:
    """SPF of the envelope sender (or of HELO for the null sender)."""
    job = scan.txn.facts.scratch.get("spf")
    if job is None:
        return
    future, identity, sender, domain, ip, via_relay = job
    sess = mgdns.session(scan)
    try:
        result, explanation = sess.wait(future)
    except mgdns.BudgetExceeded as exc:
        result, explanation = "temperror", str(exc)
    found = SpfResult(result=result, domain=domain, identity=identity, sender=sender, ip=ip,
                      explanation=explanation, via_relay=via_relay)
    scan.txn.facts.spf = found
    where = "MAIL FROM" if identity == "mailfrom" else "HELO"
    text = f"{result} for {sender} from {ip}" + (" (hop behind a trusted relay)" if via_relay else "")
    if explanation:
        text += f": {explanation}"
    hits.add(SYMBOLS[found.result], f"{domain}", ip, where=where, text=text)
