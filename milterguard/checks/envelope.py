"""Checks of the SMTP envelope: client, HELO, sender and recipients."""

from __future__ import annotations

import ipaddress

from milterguard.checks.registry import check
from milterguard.model import Hits, Stage


_IP_CHARS = frozenset("0123456789abcdefABCDEF:.")


def _is_ip_literal(text: str) -> bool:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text.lower().startswith("ipv6:"):
            text = text[5:]
    if not _IP_CHARS.issuperset(text):
        return False  # a host name: spare ipaddress its two failed parses
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@check(stage=Stage.CONNECT, emits=("RDNS_NONE",), priority=10)
def client_rdns(scan, hits: Hits) -> None:
    """Flag clients whose address has no reverse DNS name."""
    conn = scan.conn
    # The MTA reports "[ip]" as the client name when the PTR look-up found nothing.
    if conn.client_ip and conn.client_name and conn.client_name.startswith("["):
        hits.add("RDNS_NONE", conn.client_ip, where="client name", text=conn.client_name)


@check(stage=Stage.HELO, emits=("HELO_BARE_IP", "HELO_NOT_FQDN", "HELO_LOCALHOST", "HELO_IP_MISMATCH"), priority=10)
def helo_shape(scan, hits: Hits) -> None:
    """Flag HELO names that no real mail server sends."""
    conn = scan.conn
    helo = conn.helo.strip()
    if not helo:
        return
    # RFC 5321 4.1.3: an address literal must be bracketed; a bare IP is malformed.
    if _is_ip_literal(helo):
        literal = helo.strip("[]")
        if not helo.startswith("["):
            hits.add("HELO_BARE_IP", helo, where="HELO", text=helo)
        elif conn.client_ip and literal.lower().removeprefix("ipv6:") != conn.client_ip:
            hits.add("HELO_IP_MISMATCH", helo, where="HELO", text=f"{helo} from {conn.client_ip}")
        return
    lowered = helo.lower().rstrip(".")
    if lowered in ("localhost", "localhost.localdomain", "localdomain"):
        if conn.client_ip and not ipaddress.ip_address(conn.client_ip).is_loopback:
            hits.add("HELO_LOCALHOST", helo, where="HELO", text=helo)
        return
    if "." not in lowered:
        hits.add("HELO_NOT_FQDN", helo, where="HELO", text=helo)


@check(stage=Stage.EOM, emits=("RCPT_COUNT_HIGH",), priority=10)
def rcpt_count(scan, hits: Hits) -> None:
    """Flag messages sent to many envelope recipients at once."""
    count = len(scan.txn.rcpts)
    if count >= 20:
        hits.add("RCPT_COUNT_HIGH", count, where="RCPT TO", text=f"{count} recipients")
