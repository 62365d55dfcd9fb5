"""Checks of the links in a message."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

from milterguard.checks.registry import check
from milterguard.mail.domains import org_domain
from milterguard.model import Hits, Stage

# Link text that is a URL or a host name and nothing else ("https://www.bank.example/login",
# "www.bank.example", "Bank.example").  Text with other words ("News.com: Top stories") names a
# brand or a story, not a link target, and is not compared.
_SHOWN = re.compile(
    r"^(?:(?P<scheme>https?://)|(?P<www>www\.))?(?:[^\s/@]*@)?"
    r"(?P<host>(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?P<tld>[a-z]{2,24}))\.?"
    r"(?::\d{1,5})?(?:[/?#]\S*)?$",
    re.I,
)
# A bare "name.ext" is a file name more often than a site when ext is one of these.
_FILE_EXT = frozenset("htm html shtml php asp aspx jsp cgi pl pdf doc docx xls xlsx ppt pptx txt rtf csv jpg jpeg "
                      "gif png bmp zip rar gz exe js py sh md".split())
# Click-tracking and redirect services that newsletters put between the text and the target:
# a first host label or a path step that names clicks, tracking or redirection.
_TRACKER_HOST = re.compile(r"^(?:click|clicks|clk|clickthru|track|tracking|trk|redirect|redir|links?|go|email|e|t|r|l)\d*\.",
                           re.I)
_TRACKER_PATH = re.compile(r"/(?:click|clickthru|clickthrough|clk|track|tracking|trk|redirect|redir|go|r|t|c|l|ls)(?:[/?.;]|$)",
                           re.I)


# A host that browsers read as an IPv4 address though it is not written as four decimal numbers:
# one number (3232235777), hex (0xc0a80101, 0xc0.0xa8.1.1) or octal parts (0300.0250.01.01).
_OBFUSCATED_PART = r"(?:0x[0-9a-f]{1,8}|0[0-7]+|[0-9]+)"
_OBFUSCATED_IP = re.compile(rf"^{_OBFUSCATED_PART}(?:\.{_OBFUSCATED_PART}){{0,3}}$", re.I)


def obfuscated_ip(host: str) -> bool:
    """Whether HOST is an IPv4 address in a form other than dotted decimal (WHATWG URL, IPv4 parser)."""
    if not _OBFUSCATED_IP.match(host) or _is_ip(host):
        return False
    parts = host.split(".")
    if any(p.lower().startswith("0x") or (len(p) > 1 and p.startswith("0")) for p in parts):
        return True  # hex or octal parts
    # Plain decimal: one number (3232235777) or a short form whose last part spans several
    # bytes (192.11010305); "1.2.3" in a version string or 300.1.1.1 is no address anyone links.
    return len(parts) < 4 and int(parts[-1]) > 255 and len(parts[-1]) <= 10


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _shown_host(text: str) -> tuple[str, bool] | None:
    """(host the link text shows, whether it is written as a URL or www. name), or None."""
    m = _SHOWN.match(text.strip())
    if m is None:
        return None
    explicit = bool(m.group("scheme") or m.group("www"))
    if not explicit and m.group("tld").lower() in _FILE_EXT:
        return None
    return m.group("host").lower(), explicit


def _is_tracker(url, host: str) -> bool:
    """Whether URL goes through a click tracker or redirector (newsletters, ESPs)."""
    if _TRACKER_HOST.match(host):
        return True
    path = url.url.split("//", 1)[-1]
    slash = path.find("/")
    return slash >= 0 and _TRACKER_PATH.search(path, slash) is not None


def _mismatch(url, host: str, sender_orgs: set[str]) -> str | None:
    """'shown -> host' when a link's text shows another site than the link goes to."""
    shown = _shown_host(url.text)
    if shown is None:
        return None
    shown_host, explicit = shown
    shown_org = org_domain(shown_host)
    target_org = org_domain(host)
    if shown_org == target_org:
        return None
    # A redirect whose query names the shown site goes there in the end.
    query = unquote(url.url.partition("?")[2]).lower()
    if shown_org in query:
        return None
    if _is_tracker(url, host):
        return None
    # A brand name written as a bare domain ("Walmart.com") linking to the sender's own site is
    # a newsletter's shop link; phishing shows a full address ("https://www.bank.example/").
    if not explicit and target_org in sender_orgs:
        return None
    return f"{shown_host} -> {host}"


@check(stage=Stage.EOM, emits=("URI_IP_HOST", "URI_USERINFO", "URI_TEXT_MISMATCH", "URI_COUNT_HIGH",
                               "URI_ENCODED_HOST", "URI_NONSTD_PORT", "URI_IP_OBFUSCATED"), priority=30)
def uri_shape(scan, hits: Hits) -> None:
    """Links to raw IPs, links that hide their target, and link text naming another site."""
    msg = scan.message
    urls = msg.urls
    hosts: set[str] = set()
    sender_orgs: set[str] | None = None
    for url in urls:
        if url.scheme not in ("http", "https", ""):
            continue
        host = url.host
        if not host:
            continue
        hosts.add(host)
        if _is_ip(host):
            hits.add("URI_IP_HOST", host, where="URL", text=url.url[:120])
        elif host[0].isdigit() and obfuscated_ip(host):
            hits.add("URI_IP_OBFUSCATED", host, where="URL", text=url.url[:120])
        authority = url.url.split("//", 1)[-1].split("/", 1)[0]
        if "@" in authority:
            hits.add("URI_USERINFO", host, where="URL", text=url.url[:120])
        if "%" in authority:
            hits.add("URI_ENCODED_HOST", host, where="URL", text=url.url[:120])
        port = authority.rpartition(":")[2] if ":" in authority.rpartition("@")[2] else ""
        if port.isdigit() and port not in ("80", "443"):
            hits.add("URI_NONSTD_PORT", f"{host}:{port}", where="URL", text=url.url[:120])
        if url.text and not _is_ip(host) and "." in url.text:
            if sender_orgs is None:
                env = scan.txn.mail_from_domain if scan.txn else ""
                sender_orgs = {org_domain(d) for d in (msg.from_domain, env) if d}
            shown = _mismatch(url, host, sender_orgs)
            if shown:
                hits.add("URI_TEXT_MISMATCH", shown, where="link text", text=f"{url.text[:60]} -> {url.url[:80]}")
    if len(hosts) >= 15:
        hits.add("URI_COUNT_HIGH", len(hosts), where="URL", text=f"{len(hosts)} distinct hosts")
