"""URL extraction from plain text and URL/host normalisation.

Everything here is on the per-message hot path, so the scanners are
single compiled regexes and the host normaliser only does work (percent
decoding, IDNA) when the host actually needs it.  Nothing in this module
raises on hostile input.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

__all__ = ["Url", "find_text_urls", "make_url", "normalize_host", "redirect_target", "strip_trailing"]


@dataclass(slots=True)
class Url:
    """One URL found in a message.

    `url` is the URL as found (trailing punctuation removed), `scheme` is
    lowercased ("" for bare "www." hosts and scheme-less hrefs), `host` is
    lowercased and IDNA-decoded, `text` is the visible link text for HTML
    <a href> links (None otherwise) and `source` is "text" for URLs found
    in running text, "html" for URLs taken from HTML markup, "pdf" for the
    link annotations of a PDF attachment and "qr" for a QR code in an image
    (mail/attached.py), "redirect" for where a redirect or link wrapper among
    them sends the reader (redirect_target).
    """

    url: str
    scheme: str
    host: str
    text: str | None
    source: str


# The pattern starts with a plain character set so that sre can skip
# quickly to candidate positions; the branches then re-check that first
# character with a look-behind.  This is about twice as fast as re.I or a
# leading look-behind.  The "not preceded by a word character" test is
# done in Python on the few matches (see _URL_PRECEDER).
_TEXT_URL = re.compile(
    r"[hHfFwWmM]"
    r"(?:(?<=[hH])[tT][tT][pP][sS]?://"
    r"|(?<=[fF])[tT][pP]://"
    r"|(?<=[wW])[wW][wW]\."
    r"|(?<=[mM])[aA][iI][lL][tT][oO]:)"
    r"[^\s<>\"\x00-\x1f\x7f]+"
)
# A match glued to one of these is part of a longer word ("awww.x",
# "foo.www.x", "user@www.x") and is not a URL start.
_URL_PRECEDER = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@.-")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
# Browsers end the authority at any of these (a backslash counts as a
# slash for http(s), WHATWG URL "special schemes").
_AUTHORITY_END = re.compile(r"[/?#\\]")
_WWW_HOST = re.compile(r"www\.[^.]+(?:\.[^.]+)+\Z")

# Characters that are almost never the real end of a URL in prose:
# "see http://x.example/a." or "(http://x.example/)".
_TRAILING = ".,;:!?'\")>]}*"
# Full-width and ideographic dots that browsers treat as label separators.
_DOT_FOLD = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# Tabs and newlines are removed from URLs by browsers (WHATWG URL parsing).
_URL_WS = str.maketrans("", "", "\t\r\n")

_SCHEMES_WITH_AUTHORITY = frozenset({"http", "https", "ftp", "ftps", "ws", "wss", "file"})


def strip_trailing(url: str) -> str:
    """Drop trailing punctuation that belongs to the surrounding prose.

    A closing parenthesis or bracket is kept when it balances one inside
    the URL, as in Wikipedia-style "…/Foo_(bar)".
    """
    end = len(url)
    if not end or url[-1] not in _TRAILING:
        return url
    # Counted once and updated as we strip: recounting per character would
    # be quadratic on "http://x/)))))…".
    paren_open, paren_close = url.count("("), url.count(")")
    bracket_open, bracket_close = url.count("["), url.count("]")
    while end and url[end - 1] in _TRAILING:
        last = url[end - 1]
        if last == ")":
            if paren_open >= paren_close:
                break
            paren_close -= 1
        elif last == "]":
            if bracket_open >= bracket_close:
                break
            bracket_close -= 1
        end -= 1
    return url[:end]


# General categories that never appear in a valid U-label: unassigned,
# control, format, private use, surrogate (RFC 5892 2.6-2.8, DISALLOWED).
_BAD_LABEL_CATEGORIES = frozenset({"Cn", "Cc", "Cf", "Co", "Cs"})


def _idna_label(label: str) -> str:
    """Decode one "xn--" label, keeping it as is when it is not valid.

    Python's codec implements IDNA 2003, which accepts some labels that
    IDNA 2008 rejects, so the most telling checks are added here.
    """
    try:
        decoded = label.encode("ascii").decode("idna")
    except (UnicodeError, ValueError, IndexError):
        # Invalid A-label: keep the ASCII form so rules can still match it.
        return label
    if not decoded or decoded.isascii():
        return label
    # RFC 5891 4.2.3.2: a label must not begin with a combining mark.
    if unicodedata.category(decoded[0]).startswith("M"):
        return label
    if any(unicodedata.category(char) in _BAD_LABEL_CATEGORIES for char in decoded):
        return label
    return decoded


def normalize_host(host: str) -> str:
    """Lowercase a host, drop a trailing dot, percent- and IDNA-decode it.

    IPv4 and IPv6 literals are returned as text (IPv6 without brackets).
    """
    host = host.strip()
    if "%" in host:
        host = unquote(host, errors="replace")
    if not host.isascii():
        host = host.translate(_DOT_FOLD)
    host = host.lower().rstrip(".")
    if "xn--" in host:
        host = ".".join(
            _idna_label(label) if label.startswith("xn--") else label
            for label in host.split(".")
        )
    return host


def _authority_host(rest: str) -> str:
    """Host part of "user@host:port/path..." (the text after "//")."""
    end = _AUTHORITY_END.search(rest)
    authority = rest[: end.start()] if end else rest
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        # IPv6 literal, RFC 3986 3.2.2: keep the address, drop the brackets.
        close = authority.find("]")
        return authority[1:close] if close > 0 else authority[1:]
    return authority.partition(":")[0]


def make_url(url: str, text: str | None, source: str) -> Url | None:
    """Build a Url from a URL string; None when it has nothing usable."""
    if not url.isascii() or "\t" in url or "\n" in url or "\r" in url:
        url = url.translate(_URL_WS)
    url = url.strip()
    if not url:
        return None
    lower_start = url[:4].lower()
    if lower_start == "www.":
        host = normalize_host(_authority_host(url))
        return Url(url, "", host, text, source)
    match = _SCHEME.match(url)
    if match is None:
        if url.startswith("//"):
            # Protocol-relative href: the host is still known.
            return Url(url, "", normalize_host(_authority_host(url[2:])), text, source)
        return Url(url, "", "", text, source)
    scheme = match.group(1).lower()
    rest = url[match.end():]
    if scheme == "mailto":
        address = unquote(rest.partition("?")[0], errors="replace")
        # Only the first recipient's domain: "mailto:a@x,b@y".
        address = address.split(",", 1)[0]
        host = normalize_host(address.rpartition("@")[2]) if "@" in address else ""
        return Url(url, scheme, host, text, source)
    if scheme in _SCHEMES_WITH_AUTHORITY or rest.startswith("//"):
        # Browsers accept "http:/x" and "http:\\x" as "http://x".
        host = normalize_host(_authority_host(rest.lstrip("/\\")))
        return Url(url, scheme, host, text, source)
    return Url(url, scheme, "", text, source)


def find_text_urls(text: str, limit: int = 500) -> list[Url]:
    """Find http(s)/ftp URLs, bare "www." hosts and mailto: URLs in prose.

    At most `limit` matches are examined.  Results keep document order and
    may contain duplicates; the caller deduplicates across parts.
    """
    found: list[Url] = []
    for count, match in enumerate(_TEXT_URL.finditer(text)):
        if count >= limit:
            break
        start = match.start()
        if start and text[start - 1] in _URL_PRECEDER:
            continue
        raw = strip_trailing(match.group())
        url = make_url(raw, None, "text")
        if url is None:
            continue
        if url.scheme == "":
            # Bare "www." needs at least one more label ("www.example.com").
            if not _WWW_HOST.match(url.host):
                continue
        elif url.scheme != "mailto" and not url.host:
            continue
        elif url.scheme == "mailto" and not url.host:
            continue
        found.append(url)
    return found


# ------------------------------------------------------------------ redirects and link wrappers

# A query value that is itself a URL (an open redirect, a click tracker, a security gateway's
# wrapper: Outlook safelinks ?url=, Google /url?q=, Facebook l.php?u=, Symantec clicktime ?u=).
_EMBEDDED_URL = re.compile(r"(?i)^(?:https?:|https?%3a|//|www\.)")
# Proofpoint URL Defense: v2 ?u= with - for % and _ for /; v3 /v3/__URL__;
_URLDEFENSE_V3 = re.compile(r"(?i)^https?://urldefense\.com/v3/__(.+?)__;")
# Bing's click URL: u=a1 and the target in base64url.
_BING_CK = re.compile(r"(?i)^https?://(?:www\.)?bing\.com/ck/a\?")
# Google AMP viewer: google.com/amp/s/HOST/PATH is https://HOST/PATH.
_GOOGLE_AMP = re.compile(r"(?i)^https?://(?:www\.)?google\.[a-z.]{2,6}/amp/(s/)?([^?#\s]+)")
# Redirect values may hide behind one or two rounds of %-encoding.
_MAX_QUERY = 4096


def redirect_target(url: str) -> str | None:
    """The URL a redirect or link wrapper URL sends the browser to, decoded; None when it is none.

    One level: the caller may ask again of the result. Bounded to the first _MAX_QUERY
    characters of the query; never raises.
    """
    if len(url) < 12:
        return None
    m = _URLDEFENSE_V3.match(url)
    if m:
        return m.group(1)
    m = _GOOGLE_AMP.match(url)
    if m:
        return ("https://" if m.group(1) else "http://") + m.group(2)
    base, sep, query = url.partition("?")
    if not sep or not query:
        return None
    query = query.partition("#")[0][:_MAX_QUERY]
    if _BING_CK.match(url):
        for key, value in parse_qsl(query):
            if key == "u" and value.startswith("a1"):
                try:
                    decoded = base64.urlsafe_b64decode(value[2:] + "=" * (-len(value[2:]) % 4)).decode("utf-8", "replace")
                except (binascii.Error, ValueError):
                    return None
                return decoded if decoded.lower().startswith(("http:", "https:")) else None
        return None
    if "urldefense.proofpoint.com/v2/" in base.lower():
        for key, value in parse_qsl(query):
            if key == "u":
                return unquote(value.replace("-", "%").replace("_", "/"))
        return None
    if "=" not in query or ("http" not in query.lower() and "//" not in query and "www." not in query.lower()):
        return None
    for _key, value in parse_qsl(query, keep_blank_values=False):
        value = value.strip()
        if _EMBEDDED_URL.match(value):
            if value[:8].lower().startswith(("http%3a", "https%3a")):
                value = unquote(value)
            if value.startswith("//"):
                value = "https:" + value
            elif value[:4].lower() == "www.":
                value = "https://" + value
            return value
    return None
