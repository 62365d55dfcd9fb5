"""List files ("maps") of email addresses, domains, IP addresses and CIDRs.

One entry a line; `#` starts a comment.  The kind of each entry is seen
from its shape: an address has an `@`, an IP or CIDR parses as one, and
anything else is a domain, which also matches its subdomains.  A leading
`@` (`@example.org`) is the same as the domain.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from milterguard.yamlsrc import SourceError

# `map: redis:NAME` names a map kept in Redis (stores/redis_maps.py) rather than a file.
REDIS_MAP_PREFIX = "redis:"
_REDIS_MAP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def redis_map_name(name: str) -> str | None:
    """NAME without `redis:` when it names a map in Redis, else None; ValueError on a bad name."""
    if not name.startswith(REDIS_MAP_PREFIX):
        return None
    bare = name[len(REDIS_MAP_PREFIX):]
    if not _REDIS_MAP_NAME.match(bare):
        raise ValueError(f"a map in Redis is named redis:NAME, NAME of letters, digits, _ . and - "
                         f"(at most 64), got {name!r}")
    return bare


def _domain_suffixes(domain: str):
    """example.co.uk -> example.co.uk, co.uk, uk"""
    domain = domain.lower().rstrip(".")
    while domain:
        yield domain
        _, _, domain = domain.partition(".")


@dataclass
class MapFile:
    path: str
    emails: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    ips: set[str] = field(default_factory=set)
    # Networks by (family, prefix length) -> {network as int: entry}: a look-up masks
    # the address once per prefix length in use, however many networks there are.
    _nets: dict[tuple[int, int], dict[int, str]] = field(default_factory=dict)
    mtime: float = 0.0

    @classmethod
    def load(cls, path: str | Path) -> "MapFile":
        """Parse a map file; raise SourceError with file:line on a bad entry."""
        path = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8", errors="strict")
            mtime = os.stat(path).st_mtime
        except UnicodeDecodeError as exc:
            raise SourceError(path, f"not UTF-8: {exc}") from None
        except OSError as exc:
            raise SourceError(path, f"cannot read map: {exc.strerror}") from None
        return cls.parse(text, path, mtime)

    @classmethod
    def parse(cls, text: str, path: str = "<map>", mtime: float = 0.0) -> "MapFile":
        m = cls(path=path, mtime=mtime)
        nets: dict[tuple[int, int], dict[int, str]] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            if " " in entry or "\t" in entry:
                raise SourceError(f"{path}:{lineno}", f"one entry per line, got {entry!r}")
            if "@" in entry and not entry.startswith("@"):
                local, _, domain = entry.rpartition("@")
                if not local or not domain:
                    raise SourceError(f"{path}:{lineno}", f"bad address {entry!r}")
                m.emails.add(f"{local.lower()}@{domain.lower()}")
                continue
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                net = None
            if net is not None:
                if net.num_addresses == 1:
                    m.ips.add(str(net.network_address))
                else:
                    nets.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = entry
                continue
            domain = entry.lstrip("@").lstrip("*.").lower().rstrip(".")
            if not domain or ".." in domain or not all(c.isalnum() or c in "-._" for c in domain):
                raise SourceError(f"{path}:{lineno}", f"not an address, IP, CIDR or domain: {entry!r}")
            m.domains.add(domain)
        m._nets = dict(sorted(nets.items(), key=lambda kv: -kv[0][1]))
        return m

    def __len__(self) -> int:
        return len(self.emails) + len(self.domains) + len(self.ips) + sum(len(v) for v in self._nets.values())

    def match_ip(self, ip: str) -> str | None:
        """The entry matching IP (an address or a network holding it), or None."""
        addr = _ip_of(ip)
        if addr is None:
            return None
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if str(addr) in self.ips:
            return str(addr)
        value = int(addr)
        bits = 32 if addr.version == 4 else 128
        for (version, prefix), networks in self._nets.items():  # most specific first
            if version == addr.version:
                entry = networks.get(value >> (bits - prefix) << (bits - prefix))
                if entry is not None:
                    return entry
        return None

    def match_domain(self, domain: str) -> str | None:
        """The entry matching DOMAIN or one of its parent domains."""
        for suffix in _domain_suffixes(domain):
            if suffix in self.domains:
                return suffix
        return None

    def match_email(self, address: str) -> str | None:
        """The address entry, or the entry of its domain."""
        address = address.strip().strip("<>").lower()
        if address in self.emails:
            return address
        if "@" in address:
            return self.match_domain(address.rpartition("@")[2])
        return None

    def match_host(self, host: str) -> str | None:
        """A host that is an IP literal or a domain name."""
        host = host.strip("[]")
        return self.match_ip(host) if _looks_ip(host) else self.match_domain(host)

    def match_any(self, value: str) -> str | None:
        """Look VALUE up as whatever it looks like: address, IP or domain."""
        if "@" in value:
            return self.match_email(value)
        return self.match_host(value)


@functools.lru_cache(maxsize=4096)
def _ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """TEXT parsed as an IP address, or None; the same client address is looked up
    several times per message, and most host names are no address at all."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _looks_ip(text: str) -> bool:
    return _ip_of(text) is not None
