"""Allow and block lists (milterguard/lists.py), global and per recipient domain.

Each list holds four kinds of entry: email address, domain, IP address, CIDR.

- Block entries act at the earliest stage that knows the value: the client
  address at connect, the envelope sender at MAIL FROM, both again against
  the recipient domain's lists at RCPT, the header From at end of headers.
  LIST_BLOCK has a fixed reject action.
- Allow entries lower the score (LIST_ALLOW); they never lift a fixed
  action such as CLAMAV_VIRUS.  Address and domain entries match the header
  From, and not when the From domain fails DMARC (LIST_ALLOW_IGNORED
  instead): anyone can put a domain in From.  IP and CIDR entries match the
  client address.
"""

from __future__ import annotations

import ipaddress

from milterguard.engine.checks import check
from milterguard.engine.model import Hits, Stage
from milterguard.lists import GLOBAL, store_for

EMITS = ("LIST_BLOCK", "LIST_ALLOW", "LIST_ALLOW_IGNORED")


def _entry_kind(entry: str) -> str:
    if "@" in entry and not entry.startswith("@"):
        return "email"
    try:
        net = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return "domain"
    return "ip" if net.num_addresses == 1 else "cidr"


def _where(domain: str) -> str:
    return "global list" if domain == GLOBAL else f"list of {domain}"


def _client_ip(scan) -> str | None:
    ip = scan.conn.ip
    if ip is None:
        return None
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def _hit(hits: Hits, symbol: str, value: str, entry: str, domain: str, what: str) -> None:
    hits.add(symbol, f"{_entry_kind(entry)}:{entry}", where=_where(domain), text=f"{what} {value} matches {entry}")


def _block(scan, hits: Hits, domain: str, values: list[tuple[str, str, bool]]) -> bool:
    store = store_for(scan.config)
    if store is None:
        return False
    for what, value, is_ip in values:
        entry = store.lookup("block", domain, value, is_ip=is_ip)
        if entry is not None:
            _hit(hits, "LIST_BLOCK", value, entry, domain, what)
            return True
    return False


@check(stage=Stage.CONNECT, emits=EMITS, priority=1, name="lists_connect")
def lists_connect(scan, hits: Hits) -> None:
    """The client address against the global lists."""
    ip = _client_ip(scan)
    store = store_for(scan.config)
    if ip is None or store is None:
        return
    if _block(scan, hits, GLOBAL, [("client", ip, True)]):
        return
    entry = store.lookup("allow", GLOBAL, ip, is_ip=True)
    if entry is not None:
        _hit(hits, "LIST_ALLOW", ip, entry, GLOBAL, "client")


@check(stage=Stage.MAIL_FROM, emits=EMITS, priority=1, name="lists_mail_from")
def lists_mail_from(scan, hits: Hits) -> None:
    """The envelope sender against the global block list."""
    if scan.txn.mail_from:
        _block(scan, hits, GLOBAL, [("sender", scan.txn.mail_from, False)])


@check(stage=Stage.RCPT, emits=EMITS, priority=1, name="lists_rcpt")
def lists_rcpt(scan, hits: Hits) -> None:
    """Client and envelope sender against the lists of the recipient's domain."""
    txn = scan.txn
    store = store_for(scan.config)
    if store is None or not txn.rcpts or "@" not in txn.rcpts[-1]:
        return
    domain = txn.rcpts[-1].rpartition("@")[2].lower()
    ip = _client_ip(scan)
    values = ([("client", ip, True)] if ip else []) + ([("sender", txn.mail_from, False)] if txn.mail_from else [])
    if _block(scan, hits, domain, values):
        return
    if ip:
        entry = store.lookup("allow", domain, ip, is_ip=True)
        if entry is not None:
            _hit(hits, "LIST_ALLOW", ip, entry, domain, "client")


@check(stage=Stage.HEADERS, emits=EMITS, priority=1, name="lists_from_block")
def lists_from_block(scan, hits: Hits) -> None:
    """The header From against the global and the recipient domains' block lists."""
    sender = scan.message.from_addr
    if not sender:
        return
    for domain in [GLOBAL, *scan.txn.rcpt_domains]:
        if _block(scan, hits, domain, [("From", sender, False)]):
            return


@check(stage=Stage.EOM, emits=EMITS, after=("dmarc",), priority=5, name="lists_from_allow")
def lists_from_allow(scan, hits: Hits) -> None:
    """The header From against the allow lists, unless its domain fails DMARC."""
    store = store_for(scan.config)
    sender = scan.message.from_addr
    if store is None or not sender:
        return
    from_domain = scan.message.from_domain
    for domain in [GLOBAL, *scan.txn.rcpt_domains]:
        entry = store.lookup("allow", domain, sender)
        if entry is None:
            continue
        # Contract with the DMARC check: txn.facts["dmarc"] has .result and .domain.
        dmarc = scan.txn.facts.get("dmarc")
        if dmarc is not None and getattr(dmarc, "result", "") == "fail" and (
                getattr(dmarc, "domain", "") or from_domain).lower() == from_domain:
            hits.add("LIST_ALLOW_IGNORED", f"{_entry_kind(entry)}:{entry}", where=_where(domain),
                     text=f"From {sender} matches {entry}, but {from_domain} fails DMARC")
            return
        _hit(hits, "LIST_ALLOW", sender, entry, domain, "From")
        return
