"""Checks of the message headers that a pattern alone cannot express."""

from __future__ import annotations

import email.utils
import re
import time
from datetime import datetime, timezone

from milterguard.checks.registry import check
from milterguard.model import Hits, Stage

_DAY = 86400.0


# The usual shape of an RFC 5322 date with a numeric zone, read here without the
# email package's general parser (five dates a message: Date and the Received trail).
# Anything else (named zones, odd spacing, two-digit years) goes to email.utils.
_DATE = re.compile(
    r"\s*(?:[A-Za-z]{3},\s*)?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2})(?::(\d{2}))? ([+-])(\d{2})(\d{2})"
    r"(?:\s*\([^()]*\))?\s*$")
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                       "dec"), 1)}


def _parse_date(text: str) -> float | None:
    m = _DATE.match(text)
    if m is not None:
        day, name, year, hour, minute, second, sign, zh, zm = m.groups()
        month = _MONTHS.get(name.lower())
        if month is not None and year >= "1000" and zh < "24" and zm < "60":
            try:
                when = datetime(int(year), month, int(day), int(hour), int(minute), int(second or 0),
                                tzinfo=timezone.utc).timestamp()
            except (ValueError, OverflowError):
                return None
            offset = int(zh) * 3600 + int(zm) * 60
            return when + offset if sign == "-" else when - offset
    return _parse_date_slow(text)


def _parse_date_slow(text: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def _received_times(msg) -> list[float]:
    """The times of the Received headers, newest (ours) first; hops without a parseable date left out."""
    times = []
    for value in msg.header_values("Received")[:_MAX_HOPS]:
        _, sep, date = value.rpartition(";")
        if sep:
            when = _parse_date(date)
            if when is not None:
                times.append(when)
    return times


# Received headers looked at: a real trail is rarely longer, a forged one can be any length.
_MAX_HOPS = 20


@check(stage=Stage.HEADERS, emits=("DATE_INVALID", "DATE_IN_FUTURE", "DATE_IN_PAST"), priority=20)
def date_header(scan, hits: Hits) -> None:
    """Compare the Date header with the times the message was received."""
    msg = scan.message
    value = msg.header("Date")
    if value is None:
        return
    sent = _parse_date(value)
    if sent is None:
        hits.add("DATE_INVALID", where="header Date", text=value[:80])
        return
    # Against the Received headers when there are any, so that the verdict on a stored
    # message does not change with the day it is scanned.  The future is measured from the
    # newest hop (ours), the past from the oldest: mail fetched or re-delivered months later
    # (fetchmail, list archives) has a late newest hop but an oldest hop close to its Date.
    # Without a dated Received header the past is not judged: a stored message scanned
    # today is not old mail (the milter always sees the Received header of its own MTA).
    times = _received_times(msg)
    newest = times[0] if times else time.time()
    if sent - newest > _DAY:
        hits.add("DATE_IN_FUTURE", f"{(sent - newest) / _DAY:.0f}d", where="header Date", text=value[:80])
    elif times and (oldest := min(times)) - sent > 30 * _DAY:
        hits.add("DATE_IN_PAST", f"{(oldest - sent) / _DAY:.0f}d", where="header Date", text=value[:80])


# Outlook and Outlook Express: <counter + FILETIME high part $ low part $ local address @ host>.
# The high part of the FILETIME is 01c... for 1998-2014 and 01d... since (01c2 is 2002); bulk
# tools that imitate the shape fill it with random hex or zeros.
_OUTLOOK_MID = re.compile(r"^<([0-9a-f]{4,16})\$[0-9a-f]{8}\$[0-9a-f]{8}@", re.I)
_OUTLOOK_TIME = re.compile(r"01[cd][0-9a-f]{5}$", re.I)
# Outlook 2000 in Internet-only mode: 28 letters A-P (one a nibble), a dot, the address.
_OUTLOOK_IMO_MID = re.compile(r"^<[A-P]{28}\.[^@>]*@")
# Webmail and Exchange services that replace the Message-ID an Outlook client made.
_OUTLOOK_SERVER_MID = re.compile(r"@(?:[\w.-]+\.)?(?:hotmail\.com|msn\.com|outlook\.com|exchangelabs\.com)>$", re.I)
_OUTLOOK_MAILER = re.compile(r"^\s*(?:Microsoft )?(?:Office )?Outlook(?! Express Macintosh)", re.I)
# Netscape, Mozilla and Thunderbird: <8 hex digits.1-8 hex digits@host>, or a UUID since Thunderbird 78.
_MOZILLA_MID = re.compile(
    r"^<(?:[0-9A-F]{8}\.[0-9A-F]{1,8}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})@", re.I)
_MOZILLA_MAILER = re.compile(r"^\s*Mozilla[ /]\d.*(?:Gecko|Thunderbird|Netscape|\[[a-z]{2}\])", re.I)


@check(stage=Stage.HEADERS, emits=("MID_INVALID", "MSGID_OUTLOOK_BAD_TIME"), priority=20)
def message_id_shape(scan, hits: Hits) -> None:
    """RFC 5322 3.6.4: a Message-ID is <left@right>; and Outlook-shaped IDs carry a real time."""
    raw = scan.message.header_raw("Message-ID")
    if not raw:
        return
    value = raw[0].strip()
    if not (value.startswith("<") and value.endswith(">") and "@" in value):
        hits.add("MID_INVALID", where="header Message-ID", text=value[:80])
        return
    m = _OUTLOOK_MID.match(value)
    if m and not _OUTLOOK_TIME.search(m.group(1)):
        hits.add("MSGID_OUTLOOK_BAD_TIME", where="header Message-ID", text=value[:80])


@check(stage=Stage.HEADERS, emits=("X_MAILER_OUTLOOK_FORGED", "X_MAILER_MOZILLA_FORGED"), priority=20)
def mailer_vs_message_id(scan, hits: Hits) -> None:
    """The mail program named in X-Mailer or User-Agent did not make the Message-ID.

    Outlook and Mozilla write their own Message-ID in a known shape; bulk tools that name
    them in X-Mailer to look personal leave the ID to the relay or make up another one.
    """
    msg = scan.message
    mid = (msg.header_raw("Message-ID") or [""])[0].strip()
    mailer = msg.header("X-Mailer") or ""
    if _OUTLOOK_MAILER.match(mailer):
        if not (_OUTLOOK_MID.match(mid) or _OUTLOOK_IMO_MID.match(mid) or _OUTLOOK_SERVER_MID.search(mid)):
            hits.add("X_MAILER_OUTLOOK_FORGED", where="header X-Mailer", text=f"{mailer[:50]} / {mid[:60] or 'no Message-ID'}")
        return
    agent = mailer or msg.header("User-Agent") or ""
    if _MOZILLA_MAILER.match(agent) and not _MOZILLA_MID.match(mid):
        hits.add("X_MAILER_MOZILLA_FORGED", where="header X-Mailer", text=f"{agent[:50]} / {mid[:60] or 'no Message-ID'}")


@check(stage=Stage.HEADERS, emits=("FROM_EQ_TO", "REPLYTO_DOMAIN_DIFFERS", "TO_UNDISCLOSED", "FROM_NO_ADDRESS",
                                   "ENVFROM_DOMAIN_DIFFERS"), priority=20)
def address_headers(scan, hits: Hits) -> None:
    """Relations between From, To, Reply-To and the envelope sender."""
    msg = scan.message
    if msg.has_header("From") and not msg.from_addr:
        hits.add("FROM_NO_ADDRESS", where="header From", text=(msg.header("From") or "")[:80])
        return
    from_addr = msg.from_addr
    tos = [a for _, a in msg.addresses("To") if a]
    if from_addr and len(tos) == 1 and tos[0] == from_addr:
        hits.add("FROM_EQ_TO", from_addr, where="header To", text=from_addr)
    to_raw = " ".join(msg.header_raw("To")).lower()
    if "undisclosed" in to_raw or (msg.has_header("To") and not tos and to_raw.strip().endswith(":;")):
        hits.add("TO_UNDISCLOSED", where="header To", text=to_raw[:80])
    from_domain = msg.from_domain
    replies = [a.rpartition("@")[2] for _, a in msg.addresses("Reply-To") if "@" in a]
    if from_domain and replies and all(_org(r) != _org(from_domain) for r in replies):
        hits.add("REPLYTO_DOMAIN_DIFFERS", replies[0], where="header Reply-To", text=f"{replies[0]} vs {from_domain}")
    env_domain = scan.txn.mail_from_domain if scan.txn else ""
    if from_domain and env_domain and _org(env_domain) != _org(from_domain):
        hits.add("ENVFROM_DOMAIN_DIFFERS", env_domain, where="MAIL FROM", text=f"{env_domain} vs {from_domain}")


def _org(domain: str) -> str:
    """A rough organisational domain: the last two labels, three under a two-letter ccTLD SLD."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in ("co", "com", "net", "org", "ac", "gov", "edu", "ne", "or"):
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


@check(stage=Stage.HEADERS, emits=("RCVD_NONE", "RCVD_FROM_DYNAMIC"), priority=20)
def received_headers(scan, hits: Hits) -> None:
    """Received trail: none at all, or a hop named like a dial-up/dynamic host."""
    msg = scan.message
    received = msg.header_values("Received")
    if not received:
        if scan.conn.client_ip is not None or not scan.txn.mail_from:
            hits.add("RCVD_NONE", where="header Received", text="no Received header")
        return
    for value in received[:6]:
        m = _DYNAMIC.search(value)
        if m:
            hits.add("RCVD_FROM_DYNAMIC", m.group(0), where="header Received", text=value[:120])
            return


# Host names that ISPs give to dial-up, DSL and cable pools (after SpamAssassin's RDNS_DYNAMIC).
_DYNAMIC = re.compile(
    r"\bfrom\s+\S*\b(?:dial(?:up|-up|in)?|dsl|adsl|cable|ppp|pool|dyn(?:amic)?|dhcp|\d+-\d+-\d+-\d+)\b[^\s(]*",
    re.I,
)
