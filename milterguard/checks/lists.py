"""Allow and block lists (milterguard/stores/lists.py), global and per recipient domain.

Each list holds four kinds of entry: email address, domain, IP address, CIDR.

- Block entries act at the earliest stage that knows the value: the client
  address at connect, the envelope sender at MAIL FROM, both again against
  the recipient domain's lists at RCPT, the header From at end of headers.
  LIST_BLOCK has a fixed reject action.  A global entry refuses the message;
  a recipient domain's entry refuses that domain's recipients only: at RCPT
  the engine answers that RCPT alone (Verdict.rcpt), after it the recipients
  are removed at end of message (LIST_BLOCK_RCPT; the check records them in
  Facts.blocked_rcpts, and scoring puts them on the verdict, Verdict.drop_rcpts).
- Allow entries lower the score (LIST_ALLOW); they never lift a fixed
  action such as CLAMAV_VIRUS.  Address and domain entries match the header
  From, and not when the From domain fails DMARC, then the envelope sender,
  and not when it fails SPF (LIST_ALLOW_IGNORED instead): anyone can write
  an address.  IP and CIDR entries match the client address.
"""

from __future__ import annotations

import ipaddress

from milterguard.checks.registry import check
from milterguard.model import Hits, Stage
from milterguard.stores.lists import GLOBAL, store_for

EMITS = ("LIST_BLOCK", "LIST_BLOCK_RCPT", "LIST_ALLOW", "LIST_ALLOW_IGNORED")


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
    """The header From against the global block list, then each recipient domain's lists.

    A global entry refuses the message.  A recipient domain's entry concerns that
    domain's recipients alone: when every recipient is blocked the message is
    refused, else those recipients are removed at end of message (LIST_BLOCK_RCPT)
    and the others get it.  The domains' lists are also asked for the client and
    the envelope sender here, for recipients that RCPT did not refuse already
    (with actions.early_reject off, no recipient is refused at RCPT).
    """
    txn = scan.txn
    sender = scan.message.from_addr
    if sender and _block(scan, hits, GLOBAL, [("From", sender, False)]):
        return
    store = store_for(scan.config)
    if store is None:
        return
    ip = _client_ip(scan)
    values = ([("From", sender, False)] if sender else []) + ([("sender", txn.mail_from, False)] if txn.mail_from else []) \
        + ([("client", ip, True)] if ip else [])
    blocked: dict[str, tuple[str, str, str, str]] = {}  # recipient -> (domain, what, value, entry)
    for rcpt in txn.rcpts:
        domain = rcpt.rpartition("@")[2].lower()
        for what, value, is_ip in values if domain else ():
            entry = store.lookup("block", domain, value, is_ip=is_ip)
            if entry is not None:
                blocked[rcpt] = (domain, what, value, entry)
                break
    if not blocked:
        return
    if len(blocked) == len(txn.rcpts):
        domain, what, value, entry = next(iter(blocked.values()))
        _hit(hits, "LIST_BLOCK", value, entry, domain, what)
        return
    for rcpt, (domain, what, value, entry) in blocked.items():
        txn.facts.blocked_rcpts[rcpt] = f"{what} {value} matches {entry} of the {_where(domain)}"
    hits.add("LIST_BLOCK_RCPT", *blocked, where="recipient lists",
             text="; ".join(f"{rcpt}: {why}" for rcpt, why in txn.facts.blocked_rcpts.items()))


@check(stage=Stage.EOM, emits=EMITS, after=("dmarc", "spf"), priority=5, name="lists_from_allow")
def lists_from_allow(scan, hits: Hits) -> None:
    """The header From and the envelope sender against the allow lists, unless the From
    domain fails DMARC or the envelope sender fails SPF."""
    store = store_for(scan.config)
    if store is None:
        return
    txn = scan.txn
    sender = scan.message.from_addr
    from_domain = scan.message.from_domain
    domains = [GLOBAL, *txn.rcpt_domains]
    for domain in domains if sender else ():
        entry = store.lookup("allow", domain, sender)
        if entry is None:
            continue
        dmarc = txn.facts.dmarc
        if dmarc is not None and dmarc.result == "fail" and (dmarc.domain or from_domain).lower() == from_domain:
            hits.add("LIST_ALLOW_IGNORED", f"{_entry_kind(entry)}:{entry}", where=_where(domain),
                     text=f"From {sender} matches {entry}, but {from_domain} fails DMARC")
            return
        _hit(hits, "LIST_ALLOW", sender, entry, domain, "From")
        return
    for domain in domains if txn.mail_from else ():
        entry = store.lookup("allow", domain, txn.mail_from)
        if entry is None:
            continue
        spf = txn.facts.spf
        if spf is not None and spf.identity == "mailfrom" and spf.result in ("fail", "softfail"):
            hits.add("LIST_ALLOW_IGNORED", f"{_entry_kind(entry)}:{entry}", where=_where(domain),
                     text=f"envelope sender {txn.mail_from} matches {entry}, but fails SPF ({spf.result})")
            return
        _hit(hits, "LIST_ALLOW", txn.mail_from, entry, domain, "sender")
        return
