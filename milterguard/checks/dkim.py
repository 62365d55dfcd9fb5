"""DKIM (RFC 6376): every signature verified with dkimpy, keys through our resolver.

The keys of the signatures are looked up from end of headers on, while the
body arrives; the check verifies at end of message on the message rebuilt
as it was received (CRLF, raw header values), through the adapter to dkimpy
in checks/authshared.py.
"""

from __future__ import annotations

import re

import dkim as dkimpy

from milterguard.checks import authshared as auth
from milterguard.clients import dns_client as mgdns
from milterguard.checks.registry import check, starter
from milterguard.model import DkimResult, DkimSignature, Hits, Stage

HEADER = "DKIM-Signature"
# Signatures verified per message, topmost (newest) first.  Each one costs a parse of
# the whole message and a key lookup: a message with thousands of them (real mail
# has one to three) must not keep a worker busy for seconds.
MAX_SIGNATURES = 10


def tags(value: str) -> dict[str, str]:
    """The tag=value list of a signature or key record (RFC 6376 3.2), whitespace dropped."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, val = part.partition("=")
        if sep:
            out.setdefault(name.strip().lower(), re.sub(r"\s+", "", val))
    return out


def key_name(sig_tags: dict[str, str]) -> str:
    return f"{sig_tags.get('s', '')}._domainkey.{sig_tags.get('d', '')}".lower()


def start_key_lookups(scan, header: str, limit: int = MAX_SIGNATURES) -> None:
    """Start fetching the keys of the first LIMIT HEADERs (DKIM-Signature, ARC-*) of the message."""
    if not auth.active_dns(scan) or scan.txn is None:
        return
    sess = mgdns.session(scan)
    for value in auth.header_values(scan.txn, header)[:limit]:
        t = tags(value)
        if t.get("s") and t.get("d"):
            sess.start(key_name(t), "TXT")


class KeyUnavailable(Exception):
    """The key could not be fetched now (temporary DNS error, budget)."""


class KeyAbsent(Exception):
    """No usable key is published: missing or revoked."""


def key_lookup(sess: mgdns.Session):
    """A dkimpy dnsfunc that waits on our session's lookups."""

    def dnsfunc(name, timeout=5):
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
        answer = sess.get(text, "TXT")
        if answer.temporary:
            raise KeyUnavailable(f"{text}: {answer.status} {answer.error}".strip())
        if not answer.ok or not answer.texts():
            raise KeyAbsent(f"no key at {text} ({answer.status})")
        record = answer.texts()[0]
        if "p" in tags(record) and not tags(record)["p"]:
            # RFC 6376 3.6.1: an empty p= means the key was revoked.
            raise KeyAbsent(f"key revoked at {text}")
        return record.encode()

    return dnsfunc


@starter("dkim", Stage.HEADERS)
def _start(scan) -> None:
    start_key_lookups(scan, HEADER)


class DkimpyErrors:
    """A logger for dkimpy that keeps its errors: dkimpy reports a key it cannot use
    only there, and then answers False as for an altered message."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, msg, *args) -> None:
        self.errors.append(str(msg) % args if args else str(msg))

    def debug(self, *args) -> None:
        pass

    info = warning = debug


def verify_one(txn, index: int, dnsfunc) -> tuple[str, str]:
    """(result, reason) of signature INDEX of the message."""
    errors = DkimpyErrors()
    verifier = auth.DkimVerifier.parsed(auth.dkimpy_message(txn), logger=errors)
    try:
        ok = verifier.verify(index, dnsfunc=dnsfunc)
    except KeyUnavailable as exc:
        return "temperror", str(exc)
    except KeyAbsent as exc:
        return "permerror", str(exc)
    except dkimpy.KeyFormatError as exc:
        return "permerror", f"bad key: {exc}"
    except dkimpy.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return "fail", "body hash mismatch: the body was altered"
        return "permerror", f"bad signature: {exc}"
    except dkimpy.DKIMException as exc:
        return "permerror", str(exc)
    if ok:
        return "pass", ""
    key_errors = [e for e in errors.errors if "key" in e.lower()]
    if key_errors:
        return "permerror", f"bad key: {key_errors[0]}"
    return "fail", "signature mismatch: signed headers were altered"


@check(stage=Stage.EOM, emits=("R_DKIM_ALLOW", "R_DKIM_REJECT", "R_DKIM_TEMPFAIL", "R_DKIM_PERMFAIL", "R_DKIM_NA"),
       priority=40, active=mgdns.enabled)
def dkim(scan, hits: Hits) -> None:
    """Verify every DKIM signature of the message."""
    if not auth.active_dns(scan):
        return
    txn = scan.txn
    values = auth.header_values(txn, HEADER)
    if not values:
        txn.facts.dkim = DkimResult("none")
        hits.add("R_DKIM_NA", where=HEADER, text="no signature")
        return
    sess = mgdns.session(scan)
    dnsfunc = key_lookup(sess)
    found = DkimResult("none")
    symbols = {"pass": "R_DKIM_ALLOW", "fail": "R_DKIM_REJECT", "temperror": "R_DKIM_TEMPFAIL",
               "permerror": "R_DKIM_PERMFAIL"}
    by_symbol: dict[str, list[tuple[str, str, str]]] = {}  # symbol -> (option, place, reason) per signature
    for index, value in enumerate(values[:MAX_SIGNATURES]):
        t = tags(value)
        domain, selector = t.get("d", "").lower(), t.get("s", "")
        result, reason = verify_one(txn, index, dnsfunc)
        found.signatures.append(DkimSignature(domain, selector, result, reason))
        by_symbol.setdefault(symbols[result], []).append((f"{domain}:{selector}", f"#{index + 1} (key {key_name(t)})",
                                                          reason or "verifies"))
    for symbol, sigs in by_symbol.items():
        # One hit per symbol: each signature's key and reason, so that two failing signatures both show.
        if len(sigs) == 1:
            where, text = f"{HEADER} {sigs[0][1]}", sigs[0][2]
        else:
            where = f"{HEADER} " + ", ".join(place for _, place, _ in sigs)
            text = "; ".join(f"{place.split()[0]} {reason}" for _, place, reason in sigs)
        hits.add(symbol, *(option for option, _, _ in sigs), where=where, text=text)
    order = ("pass", "fail", "temperror", "permerror")
    found.result = next(r for r in order if any(s.result == r for s in found.signatures))
    txn.facts.dkim = found
