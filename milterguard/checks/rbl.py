"""DNS blocklists: IP lists (DNSBL), domain lists (RHSBL) and URI lists (SURBL style).

Lists are declared in the configuration (`rbl.lists`, docs/authentication.md):
a zone, the kind of thing it lists, and how its answers map to symbols.  The
symbols are declared in rule files (rules/rbl.yaml, or local ones) like any
other, within the families `RBL_*`, `RHSBL_*` and `URIBL_*`.

Lookups start at the stage that first has the data (the client at connect,
the sender at MAIL FROM, From and Received at end of headers, URLs at end of
message) and are collected within the message's DNS budget by two checks:
`rbl_envelope` at MAIL FROM (so that a listing with a fixed action can refuse
at the first RCPT) and `rbl_content` at end of message.

An answer in a list's `blocked` ranges (127.255.255.0/24 by default: Spamhaus
says so to public resolvers and over-quota users) is an error, RBL_BLOCKED,
never a listing, and logged once per process, list and resolver.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass

from milterguard.checks import authshared as auth
from milterguard.mail.domains import org_domain
from milterguard.clients import dns_client as mgdns
from milterguard.checks.registry import check, configured_symbols, starter
from milterguard.model import Hits, Stage

log = logging.getLogger("milterguard.rbl")

FAMILIES = ("RBL_*", "RHSBL_*", "URIBL_*")
DEFAULT_BLOCKED = ["127.255.255.0/24"]

# Which stage starts each kind of lookup, and which check collects it.
START_STAGE = {"ip": Stage.CONNECT, "helo": Stage.HELO, "sender": Stage.MAIL_FROM, "from": Stage.HEADERS,
               "received": Stage.HEADERS, "uri": Stage.EOM, "uri_ip": Stage.EOM}
ENVELOPE_KINDS = ("ip", "helo", "sender")
CONTENT_KINDS = ("from", "received", "uri", "uri_ip")


@dataclass
class Query:
    list_name: str
    value: str  # what is looked up: an IP or a domain
    name: str  # the DNS name queried
    where: str


def reversed_ip(ip: str) -> str | None:
    """1.2.3.4 -> 4.3.2.1; IPv6 as nibbles (RFC 5782 2.4)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 4:
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def listable_ip(ip: str | None) -> bool:
    """Lists hold public addresses only; private, loopback and documentation ones are not asked about."""
    if not ip:
        return False
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def active_lists(config, kinds: tuple[str, ...] | None = None) -> dict[str, dict]:
    if not config["rbl.enabled"] or not mgdns.enabled(config):
        return {}
    out = {}
    for name, spec in config["rbl.lists"].items():
        if not spec.get("enabled", True) or not spec.get("zone"):
            continue
        if spec.get("public") and not config["rbl.public"]:
            continue
        if spec.get("free") and not (config["rbl.free_lists"] or config["rbl.public"]):
            continue
        if kinds is not None and spec.get("kind", "ip") not in kinds:
            continue
        out[name] = spec
    return out


def _skip_domain(scan, domain: str) -> bool:
    """Our own domains (the recipients'), rbl.skip_domains and globally allowed domains are not looked up."""
    if auth.under(domain, scan.config["rbl.skip_domains"]):
        return True
    if scan.txn is not None and auth.under(domain, scan.txn.rcpt_domains):
        return True
    try:
        from milterguard.stores.lists import GLOBAL, store_for
    except ImportError:  # pragma: no cover - lists are part of the package
        return False
    store = store_for(scan.config)
    return store is not None and store.lookup("allow", GLOBAL, domain) is not None


def _values(scan, kind: str) -> list[tuple[str, str]]:
    """(value, where) pairs that lists of KIND look up for this message."""
    conn, txn = scan.conn, scan.txn
    if kind == "ip":
        return [(conn.client_ip, "client")] if listable_ip(conn.client_ip) else []
    if kind == "helo":
        helo = conn.helo.strip().rstrip(".").lower()
        return [(helo, "HELO")] if "." in helo and not helo.startswith("[") else []
    if txn is None:
        return []
    if kind == "sender":
        domain = org_domain(txn.mail_from_domain) if txn.mail_from_domain else ""
        return [(domain, "MAIL FROM")] if domain and not _skip_domain(scan, domain) else []
    msg = scan.message
    if kind == "from":
        domain = org_domain(msg.from_domain) if msg is not None and msg.from_domain else ""
        return [(domain, "From")] if domain and not _skip_domain(scan, domain) else []
    if kind == "received":
        return [(ip, "Received") for ip in dict.fromkeys(auth.received_ips(txn))
                if listable_ip(ip) and ip != conn.client_ip][:5]
    if msg is None:
        return []
    hosts = list(dict.fromkeys(u.host.lower().rstrip(".") for u in msg.urls if u.host))
    out: list[tuple[str, str]] = []
    for host in hosts:
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
            is_ip = True
        except ValueError:
            is_ip = False
        if kind == "uri_ip" and is_ip and listable_ip(host):
            out.append((host, "URL"))
        elif kind == "uri" and not is_ip and "." in host:
            domain = org_domain(host)
            if not _skip_domain(scan, domain) and (domain, "URL") not in out:
                out.append((domain, "URL"))
    return out[: scan.config["rbl.max_uris"]]


def _queries(scan, kinds: tuple[str, ...]) -> list[Query]:
    out = []
    for list_name, spec in active_lists(scan.config, kinds).items():
        kind = spec.get("kind", "ip")
        for value, where in _values(scan, kind):
            key = reversed_ip(value) if kind in ("ip", "received", "uri_ip") else value
            if key:
                out.append(Query(list_name, value, f"{key}.{spec['zone'].strip('.')}", where))
    return out


def _start_kinds(scan, kinds: tuple[str, ...]) -> None:
    sess = mgdns.session(scan)
    for query in _queries(scan, kinds):
        sess.start(query.name, "A")


def _starter_for(stage: Stage):
    kinds = tuple(k for k, s in START_STAGE.items() if s == stage)
    collector = "rbl_envelope" if all(k in ENVELOPE_KINDS for k in kinds) else "rbl_content"

    def start(scan) -> None:
        if auth.active(scan):
            _start_kinds(scan, kinds)

    start.__name__ = f"rbl_start_{stage.label}"
    starter(collector, stage)(start)


for _stage in sorted(set(START_STAGE.values())):
    _starter_for(_stage)


def _in(address: str, ranges: list[str]) -> bool:
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in ranges:
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def symbols_for(spec: dict, address: str) -> list[str]:
    """The symbols one answer address means for a list ([] when it means nothing)."""
    codes = spec.get("codes", {})
    if spec.get("bitmask"):
        try:
            value = int(ipaddress.ip_address(address)) & 0xFF
        except ValueError:
            return []
        found = [sym for code, sym in codes.items() if int(ipaddress.ip_address(code.split("/")[0])) & 0xFF & value]
    else:
        found = [sym for code, sym in codes.items() if _in(address, [code])]
    if not found and _in(address, ["127.0.0.0/8"]) and spec.get("symbol"):
        found = [spec["symbol"]]
    return found


# (list, resolver) pairs whose refusal this process has logged: one line each, not one per message.
_BLOCKED_LOGGED: set[tuple[str, str]] = set()
_BLOCKED_LOCK = threading.Lock()
# What Spamhaus's error answers mean (its DNSBL usage FAQ); other lists' are shown as they are.
_BLOCKED_MEANING = {
    "127.255.255.252": "a malformed query",
    "127.255.255.254": "a query through a public or open resolver",
    "127.255.255.255": "more queries than the free use allows",
    "127.0.1.255": "an IP address asked as a domain",
}


def _log_blocked(config, list_name: str, spec: dict, address: str, name: str) -> None:
    """Say once per process, list and resolver that a list refuses our resolver, and what to do."""
    servers = ", ".join(mgdns.resolver_for(config).server_labels) or "the system's resolver"
    key = (list_name, servers)
    with _BLOCKED_LOCK:
        if key in _BLOCKED_LOGGED:
            return
        _BLOCKED_LOGGED.add(key)
    meaning = _BLOCKED_MEANING.get(address, "a refusal")
    switch = ("rbl.free_lists: false" if spec.get("free") else
              "rbl.public: false" if spec.get("public") else f"rbl.lists.{list_name}.enabled: false")
    log.warning("blocklist %s (%s) refuses queries through resolver %s: it answered %s to %s (%s); its "
                "answers are not counted. Use a recursive resolver of your own in dns.nameservers, or "
                "turn the list off (%s). Said once per process.",
                list_name, spec.get("zone", "?"), servers, address, name, meaning, switch)


def _collect(scan, hits: Hits, kinds: tuple[str, ...]) -> None:
    sess = mgdns.session(scan)
    # Lookups started at connect live in the connection's session: collect those too.
    conn_sess = scan.conn.facts.dns
    lists = active_lists(scan.config)
    for query in _queries(scan, kinds):
        spec = lists[query.list_name]
        future = conn_sess.started.get((query.name, "A")) if conn_sess is not None else None
        try:
            answer = sess.wait(future) if future is not None else sess.get(query.name, "A")
        except mgdns.BudgetExceeded as exc:
            answer = mgdns.Answer(query.name, "A", mgdns.TIMEOUT, error=str(exc))
        if answer.temporary:
            hits.add("RBL_TEMPFAIL", query.list_name, where=query.where, text=f"{query.name}: {answer.status}")
            continue
        if not answer.ok:
            continue
        blocked = [a for a in answer.records if _in(a, spec.get("blocked") or DEFAULT_BLOCKED)]
        if blocked:
            hits.add("RBL_BLOCKED", query.list_name, blocked[0], where=query.where,
                     text=f"{query.name} answered {blocked[0]}: the list refuses our resolver; not a listing")
            _log_blocked(scan.config, query.list_name, spec, blocked[0], query.name)
            continue
        for address in answer.records:
            for symbol in symbols_for(spec, address):
                hits.add(symbol, query.value, where=query.where,
                         text=f"{query.value} listed by {spec['zone']} ({address})")


@configured_symbols
def _list_symbols(config) -> dict[str, str]:
    """The symbols rbl.lists names (of every list, on or off), so that the rule files must declare them."""
    out = {}
    for name, spec in config["rbl.lists"].items():
        collector = "rbl_envelope" if spec.get("kind", "ip") in ENVELOPE_KINDS else "rbl_content"
        for symbol in [spec.get("symbol", ""), *spec.get("codes", {}).values()]:
            if symbol:
                out[symbol] = f"{collector} (rbl.lists.{name})"
    return out


@check(stage=Stage.MAIL_FROM, emits=FAMILIES, priority=30,
       active=lambda config: bool(active_lists(config, ENVELOPE_KINDS)))
def rbl_envelope(scan, hits: Hits) -> None:
    """The client address, HELO name and sender domain against the DNS blocklists."""
    if auth.active(scan):
        _collect(scan, hits, ENVELOPE_KINDS)


@check(stage=Stage.EOM, emits=FAMILIES, priority=35,
       active=lambda config: bool(active_lists(config, CONTENT_KINDS)))
def rbl_content(scan, hits: Hits) -> None:
    """From domain, Received addresses and URL hosts against the DNS blocklists."""
    if auth.active(scan):
        _collect(scan, hits, CONTENT_KINDS)
