"""The Authentication-Results header (RFC 8601) of what SPF, DKIM, DMARC and ARC found.

Headers that arrived claiming our authserv-id are forged (or ours from an
earlier pass): they are removed before ours is added, and reported.
"""

from __future__ import annotations

from milterguard.checks import authshared as auth
from milterguard.clients import dns_client as mgdns
from milterguard.checks.registry import check
from milterguard.model import AuthResults, Hits, Stage

HEADER = "Authentication-Results"


def _methods(txn) -> list[str]:
    out = []
    spf = txn.facts.spf
    if spf is not None:
        prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
        ident = spf.sender if spf.identity == "mailfrom" else spf.domain
        out.append(f"spf={spf.result} {auth.comment('client ' + spf.ip)} {prop}={auth.value(ident)}")
    dkim = txn.facts.dkim
    if dkim is not None:
        if not dkim.signatures:
            out.append("dkim=none")
        for sig in dkim.signatures:
            note = f" {auth.comment(sig.reason)}" if sig.reason else ""
            out.append(f"dkim={sig.result}{note} header.d={auth.value(sig.domain or 'unknown')} "
                       f"header.s={auth.value(sig.selector or 'unknown')}")
    arc = txn.facts.arc
    if arc is not None:
        note = f" {auth.comment(arc.sealer)}" if arc.sealer else ""
        out.append(f"arc={arc.result}{note}")
    dmarc = txn.facts.dmarc
    if dmarc is not None:
        policy, applied = dmarc.policy, dmarc.applied
        note = f" {auth.comment('p=' + policy + (' applied ' + applied if applied else ''))}" if policy else ""
        out.append(f"dmarc={dmarc.result}{note} header.from={auth.value(dmarc.domain or 'unknown')}")
    return out


@check(stage=Stage.EOM, emits=("AUTH_RESULTS_FORGED",), after=("spf", "dkim", "arc", "dmarc"), priority=90,
       active=lambda config: config["auth.results_header"] and mgdns.enabled(config))
def auth_results(scan, hits: Hits) -> None:
    """Build the Authentication-Results header; find the forged ones to remove."""
    cfg = scan.config
    if not cfg["auth.results_header"] or not auth.active_dns(scan):
        return
    txn = scan.txn
    results = AuthResults(auth.authserv_id(scan))
    ours = results.authserv_id.lower()
    for index, value in enumerate(auth.header_values(txn, HEADER), start=1):
        if auth.claimed_authserv_id(value) == ours:
            results.forged.append(index)
    if results.forged:
        hits.add("AUTH_RESULTS_FORGED", ours, where=HEADER,
                 text=f"{len(results.forged)} header(s) claiming {ours} removed")
    results.methods = _methods(txn)
    txn.facts.auth_results = results
