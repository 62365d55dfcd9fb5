"""What the sender authentication checks share: the message as received,
the hop to judge, registered domains and Authentication-Results syntax.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache

from milterguard.clients import dns_client as mgdns
from milterguard.mail.domains import org_domain


def active_dns(scan) -> bool:
    """Whether signatures (DKIM, ARC) are checked: DNS on, and not a logged-in client."""
    if not mgdns.enabled(scan.config):
        return False
    return not (scan.config["auth.skip_authenticated"] and scan.conn.authenticated)


def active(scan) -> bool:
    """Whether the client's own authorisation (SPF, DMARC, blocklists) is judged:
    DNS on, and a remote client that did not log in."""
    if not active_dns(scan):
        return False
    if not scan.config["auth.skip_authenticated"]:
        return True
    ip = scan.conn.ip
    return ip is not None and not ip.is_loopback


def header_values(txn, name: str) -> list[str]:
    """The raw values of header NAME, in order (an index built once per message)."""
    headers = txn.headers
    index = txn.facts.scratch.get("raw_header_index")
    if index is None or index[0] != len(headers):
        by_name: dict[str, list[str]] = {}
        for n, v in headers:
            by_name.setdefault(n.lower(), []).append(v)
        index = txn.facts.scratch["raw_header_index"] = (len(headers), by_name)
    return list(index[1].get(name.lower(), ()))


# ---------------------------------------------------------------- relays and hops


@lru_cache(maxsize=64)
def _networks(entries: tuple[str, ...]) -> tuple:
    nets = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    return tuple(nets)


def in_networks(ip: str | None, entries: list[str]) -> bool:
    if not ip or not entries:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in _networks(tuple(entries)))


_RECEIVED_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")


def received_ips(txn) -> list[str]:
    """Client addresses of the Received headers, newest first (the bracketed ones)."""
    out = []
    for value in header_values(txn, "Received"):
        # Only the "from" clause: the part before " by ".
        part = re.split(r"\sby\s", value, maxsplit=1)[0]
        for m in _RECEIVED_IP.finditer(part):
            try:
                out.append(str(ipaddress.ip_address(m.group(1))))
                break
            except ValueError:
                continue
    return out


def spf_hop(scan) -> tuple[str | None, bool]:
    """(the IP SPF is judged on, whether it came from Received behind a trusted relay)."""
    ip = scan.conn.client_ip
    relays = scan.config["auth.trusted_relays"]
    if not in_networks(ip, relays):
        return ip, False
    if scan.txn is None or not scan.txn.headers:
        return None, True  # only the headers tell: wait for them
    for hop in received_ips(scan.txn):
        if not in_networks(hop, relays):
            return hop, True
    return None, True


# ---------------------------------------------------------------- domains


def aligned(a: str, b: str, mode: str) -> bool:
    """RFC 7489 3.1: strict means equal, relaxed means the same organisational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return org_domain(a) == org_domain(b)


def under(domain: str, roots: list[str]) -> bool:
    domain = domain.lower().rstrip(".")
    for root in roots:
        root = root.lower().strip().rstrip(".")
        if root and (domain == root or domain.endswith("." + root)):
            return True
    return False


# ---------------------------------------------------------------- Authentication-Results


def authserv_id(scan) -> str:
    configured = scan.config["auth.authserv_id"]
    if configured:
        return configured
    return scan.conn.macros.get("j") or _hostname()


@lru_cache(maxsize=1)
def _hostname() -> str:
    # Not getfqdn(): that asks DNS, and the MTA's j macro is the name that counts anyway.
    return socket.gethostname()


_TOKEN_OK = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+$")


def value(text: str) -> str:
    """A method property value: a token as it is, anything else quoted (RFC 8601 2.2)."""
    if _TOKEN_OK.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(text: str) -> str:
    return "(" + re.sub(r"[()\\\r\n]", " ", text)[:120] + ")"


def claimed_authserv_id(header_value: str) -> str:
    """The authserv-id an Authentication-Results value begins with (comments skipped)."""
    text = header_value.strip()
    while text.startswith("("):
        depth, i = 0, 0
        for i, ch in enumerate(text):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
        text = text[i + 1:].strip()
    m = re.match(r"[^\s;()]+", text)
    return m.group(0).strip('"').lower() if m else ""
