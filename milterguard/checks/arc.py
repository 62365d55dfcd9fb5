"""ARC (RFC 8617): verify the chain of a forwarded message with dkimpy.

The keys of the ARC-Seal and ARC-Message-Signature headers are looked up
from end of headers on, through our resolver.  A valid chain whose latest
seal comes from a domain in `auth.trusted_arc_sealers` lets DMARC spare a
forwarded message its policy (checks/dmarc.py).
"""

from __future__ import annotations


import dkim as dkimpy

from milterguard.checks import authshared as auth
from milterguard.clients import dns_client as mgdns
from milterguard.checks.dkim import DkimpyErrors, KeyAbsent, KeyUnavailable, key_lookup, start_key_lookups
from milterguard.checks.registry import check, starter
from milterguard.model import ArcResult, Hits, Stage

MAX_ARC_SETS = 50

@starter("arc", Stage.HEADERS)
def _start(scan) -> None:
    # At most 50 ARC sets are valid (RFC 8617 4.2.1); what lies beyond is never verified.
    start_key_lookups(scan, "ARC-Seal", limit=MAX_ARC_SETS)
    start_key_lookups(scan, "ARC-Message-Signature", limit=MAX_ARC_SETS)


@check(stage=Stage.EOM, emits=("ARC_ALLOW", "ARC_REJECT", "ARC_NA", "ARC_TEMPFAIL"), priority=42,
       active=mgdns.enabled)
def arc(scan, hits: Hits) -> None:
    """Verify the ARC chain of the message."""
    if not auth.active_dns(scan):
        return
    txn = scan.txn
    if not auth.header_values(txn, "ARC-Seal"):
        txn.facts.arc = ArcResult("none")
        hits.add("ARC_NA", where="ARC-Seal", text="no ARC set")
        return
    dnsfunc = key_lookup(mgdns.session(scan))
    try:
        # dkimpy logs what is wrong with a set as an error of its own; the reason says it too.
        cv, sets, reason = auth.arc_verify(auth.dkimpy_message(txn), logger=DkimpyErrors(), dnsfunc=dnsfunc)
    except KeyUnavailable as exc:
        txn.facts.arc = ArcResult("temperror", reason=str(exc))
        hits.add("ARC_TEMPFAIL", where="ARC-Seal", text=str(exc))
        return
    except KeyAbsent as exc:
        cv, sets, reason = b"fail", [], str(exc)
    except dkimpy.DKIMException as exc:
        cv, sets, reason = b"fail", [], f"broken ARC set: {exc}"
    result = cv.decode() if isinstance(cv, bytes) else str(cv)
    sets = sorted(sets or [], key=lambda s: s.get("instance", 0))
    latest = sets[-1] if sets else {}
    sealer = (latest.get("as-domain") or b"").decode("ascii", "replace").lower()
    found = ArcResult(result if result in ("pass", "fail", "none") else "fail", sealer=sealer, instances=len(sets),
                      reason=reason.decode() if isinstance(reason, bytes) else str(reason),
                      results=[(s.get("aar-value") or b"").decode("utf-8", "replace").strip() for s in sets])
    found.trusted = bool(sealer) and auth.under(sealer, scan.config["auth.trusted_arc_sealers"])
    txn.facts.arc = found
    where = f"ARC-Seal i={found.instances}" if found.instances else "ARC-Seal"
    text = f"cv={found.result} ({found.reason})" + (f", sealed by {sealer}" if sealer else "")
    if found.trusted:
        text += " (trusted sealer)"
    if found.result == "pass":
        hits.add("ARC_ALLOW", sealer, f"i={found.instances}", where=where, text=text)
    else:
        hits.add("ARC_REJECT", sealer or "?", where=where, text=text)
