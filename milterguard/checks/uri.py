"""Checks of the links in a message."""

from __future__ import annotations

import ipaddress
import re

from milterguard.engine.checks import check
from milterguard.engine.model import Hits, Stage

_DOMAINISH = re.compile(r"^(?:https?://)?(?:www\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)+)(?:[/:?#]|$)", re.I)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _base(host: str) -> str:
    labels = host.lower().rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


@check(stage=Stage.EOM, emits=("URI_IP_HOST", "URI_USERINFO", "URI_TEXT_MISMATCH", "URI_COUNT_HIGH",
                               "URI_ENCODED_HOST", "URI_NONSTD_PORT"), priority=30)
def uri_shape(scan, hits: Hits) -> None:
    """Links to raw IPs, links that hide their target, and link text naming another site."""
    urls = scan.message.urls
    hosts: set[str] = set()
    for url in urls:
        if url.scheme not in ("http", "https", ""):
            continue
        host = url.host
        if not host:
            continue
        hosts.add(host)
        if _is_ip(host):
            hits.add("URI_IP_HOST", host, where="URL", text=url.url[:120])
        authority = url.url.split("//", 1)[-1].split("/", 1)[0]
        if "@" in authority:
            hits.add("URI_USERINFO", host, where="URL", text=url.url[:120])
        if "%" in authority:
            hits.add("URI_ENCODED_HOST", host, where="URL", text=url.url[:120])
        port = authority.rpartition(":")[2] if ":" in authority.rpartition("@")[2] else ""
        if port.isdigit() and port not in ("80", "443"):
            hits.add("URI_NONSTD_PORT", f"{host}:{port}", where="URL", text=url.url[:120])
        if url.text:
            m = _DOMAINISH.match(url.text.strip())
            if m and not _is_ip(host):
                shown = m.group(1).lower()
                if _base(shown) != _base(host) and "." in shown:
                    hits.add("URI_TEXT_MISMATCH", f"{shown} -> {host}", where="link text", text=f"{url.text[:60]} -> {url.url[:80]}")
    if len(hosts) >= 15:
        hits.add("URI_COUNT_HIGH", len(hosts), where="URL", text=f"{len(hosts)} distinct hosts")
