"""Parsed view of one mail message: headers, MIME parts, text and URLs.

Built for the per-message hot path of the milter:

* the MIME splitter is hand-rolled over bytes (line ends normalised to
  LF once), which is several times faster than `email` with any policy,
  and it never raises: malformed input becomes an entry in `defects`;
* headers are parsed eagerly (every stage needs them), everything else
  (parts, text, URLs, addresses) is computed on first use and cached;
* work is bounded: only `max_scan_bytes` of the message are scanned, text
  is capped at `max_text_chars`, MIME nesting at MAX_DEPTH and leaf parts
  at MAX_PARTS, URLs at MAX_URLS.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import BinaryIO

from milterguard.mail.addresses import parse_addresses
from milterguard.mail.attached import LinkLimits, attached_links
from milterguard.mail.charsets import decode_bytes, decode_header_value
from milterguard.mail.defects import DEFECTS, HEADER_8BIT, HEADER_NO_COLON, MIME_MISSING_VERSION
from milterguard.mail.headers import Header, make_headers, parse_params, split_entity, unfold
from milterguard.mail.htmltext import extract_links, html_to_text
from milterguard.mail.mime import MAX_DEPTH, MAX_PARTS, MimeWalker, Part, is_multipart
from milterguard.mail.urls import Url, find_text_urls, make_url, redirect_target

__all__ = [
    "DEFECTS",
    "Header",
    "Message",
    "Part",
    "Url",
    "decode_bytes",
    "decode_header_value",
    "parse_params",
    "MAX_DEPTH",
    "MAX_PARTS",
]

MAX_URLS = 500
DEFAULT_LINK_LIMITS = LinkLimits()
_ANGLE_ID = re.compile(r"<([^<>]*)>")


def scanned_body(body, body_size: int | None, max_scan_bytes: int) -> tuple[bytes, bool, int]:
    """(the part of BODY that is scanned, with LF line ends; whether it was cut; the full body size).

    BODY is bytes or a file read from 0; BODY_SIZE, when known, is the size the MTA sent.
    """
    data, known_size = read_body(body, max_scan_bytes)
    data, truncated = limit_lines(data, max_scan_bytes)
    if body_size is None:
        body_size = known_size if known_size is not None else len(data)
    if b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")
    return data, truncated, body_size


def read_body(body: BinaryIO | bytes, limit: int) -> tuple[bytes, int | None]:
    """Read at most limit + 1 bytes of a body; also return its size if known."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body)
        return data[: limit + 1], len(data)
    body.seek(0)
    data = body.read(limit + 1)
    try:
        size = body.seek(0, 2)
    except (OSError, ValueError):
        size = None
    return data, size


def limit_lines(data: bytes, limit: int) -> tuple[bytes, bool]:
    """Cut data to limit bytes at a line end; return (data, truncated)."""
    if len(data) <= limit:
        return data, False
    data = data[:limit]
    cut = data.rfind(b"\n")
    if cut > 0:
        # A half line would only create bogus base64/boundary defects.
        data = data[: cut + 1]
    return data, True


class Message:
    """A parsed message.  Build it with from_bytes() or from_parts().

    Headers are parsed at construction; parts, text, URLs and addresses are
    computed on first access and cached.  Nothing here raises on malformed
    mail: problems are listed in `defects`.
    """

    def __init__(self, headers: list[Header], body: bytes, *, size: int, scan_truncated: bool,
                 defects: list[str], max_text_chars: int, link_limits: LinkLimits | None = None) -> None:
        self.headers = headers
        self.link_limits = link_limits or DEFAULT_LINK_LIMITS
        self.size = size
        self._defects = defects
        self._body = body
        self._scan_truncated = scan_truncated
        self._max_text_chars = max_text_chars
        self._header_parse: tuple[int, int, tuple[str, ...]] | None = None  # set by from_parts

    # -- construction ------------------------------------------------------

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_scan_bytes: int = 10 * 1024 * 1024,
                   max_text_chars: int = 512 * 1024, link_limits: LinkLimits | None = None) -> "Message":
        """Parse a whole RFC 5322 message (CRLF or LF; an mbox "From " line is skipped)."""
        if raw.startswith(b"From "):
            newline = raw.find(b"\n")
            raw = raw[newline + 1:] if newline >= 0 else b""
        size = len(raw)
        data, truncated = limit_lines(raw, max_scan_bytes)
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        pairs, body, malformed, eight_bit = split_entity(data, lenient=True)
        defects: list[str] = []
        if eight_bit:
            defects.append(HEADER_8BIT)
        if malformed:
            defects.append(HEADER_NO_COLON)
        headers = make_headers(pairs, defects)
        return cls(headers, body, size=size, scan_truncated=truncated, defects=defects,
                   max_text_chars=max_text_chars, link_limits=link_limits)

    @classmethod
    def from_parts(cls, headers: list[tuple[str, str]], body: BinaryIO | bytes, *,
                   body_size: int | None = None, max_scan_bytes: int = 10 * 1024 * 1024,
                   max_text_chars: int = 512 * 1024, link_limits: LinkLimits | None = None) -> "Message":
        """Build from MTA-supplied headers and a body (bytes or a file read from 0).

        Only the first max_scan_bytes of the body are read.  `body_size`,
        when given, is the full body size used for `size`.
        """
        defects: list[str] = []
        pairs: list[tuple[str, str]] = []
        header_bytes = 2  # the blank line between headers and body
        eight_bit = False
        for name, value in headers:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "surrogateescape")
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            if not value.isascii() or not name.isascii():
                eight_bit = True
            # "Name: value\r\n" on the wire.
            header_bytes += len(name) + len(value.encode("utf-8", "surrogateescape")) + 4
            pairs.append((name, unfold(value)))
        if eight_bit:
            defects.append(HEADER_8BIT)
        data, truncated, body_size = scanned_body(body, body_size, max_scan_bytes)
        parsed = make_headers(pairs, defects)
        msg = cls(parsed, data, size=header_bytes + body_size, scan_truncated=truncated, defects=defects,
                  max_text_chars=max_text_chars, link_limits=link_limits)
        # What with_body needs to reuse this header parse (the defects before any MIME walk).
        msg._header_parse = (len(headers), header_bytes, tuple(defects))
        return msg

    def with_body(self, body: BinaryIO | bytes, *, body_size: int | None = None,
                  max_scan_bytes: int = 10 * 1024 * 1024, max_text_chars: int = 512 * 1024,
                  link_limits: LinkLimits | None = None) -> "Message":
        """This message's headers with BODY: what from_parts would build from the same headers.

        For a message built by from_parts (the headers alone, at end of headers): the
        header fields, their index and the values derived from headers only (addresses,
        Subject, From, Message-ID) are reused instead of parsed again; nothing derived
        from this message's body is.
        """
        _, header_bytes, header_defects = self._header_parse
        data, truncated, body_size = scanned_body(body, body_size, max_scan_bytes)
        msg = type(self)(self.headers, data, size=header_bytes + body_size, scan_truncated=truncated,
                         defects=list(header_defects), max_text_chars=max_text_chars, link_limits=link_limits)
        msg._header_parse = self._header_parse
        cached = self.__dict__
        for name in _HEADER_DERIVED:
            if name in cached:
                msg.__dict__[name] = cached[name]
        if "_address_cache" in cached:
            msg.__dict__["_address_cache"] = dict(cached["_address_cache"])
        return msg

    @property
    def header_count(self) -> int | None:
        """How many MTA-supplied header fields from_parts was given, or None (from_bytes)."""
        return self._header_parse[0] if self._header_parse is not None else None

    # -- headers -----------------------------------------------------------

    @cached_property
    def _header_index(self) -> dict[str, list[Header]]:
        index: dict[str, list[Header]] = {}
        for header in self.headers:
            index.setdefault(header.name.lower(), []).append(header)
        return index

    def header(self, name: str) -> str | None:
        """First decoded value of header `name` (case-insensitive), or None."""
        found = self._header_index.get(name.lower())
        return found[0].value if found else None

    def header_values(self, name: str) -> list[str]:
        """All decoded values of header `name`, in order."""
        return [header.value for header in self._header_index.get(name.lower(), ())]

    def header_raw(self, name: str) -> list[str]:
        """All raw (unfolded, undecoded) values of header `name`, in order."""
        return [header.raw for header in self._header_index.get(name.lower(), ())]

    def has_header(self, name: str) -> bool:
        """True when at least one header `name` is present."""
        return name.lower() in self._header_index

    def header_block(self) -> str:
        """All headers as "Name: raw" lines, for whole-header rules."""
        return "".join(f"{header.name}: {header.raw}\n" for header in self.headers)

    def addresses(self, name: str) -> list[tuple[str, str]]:
        """(decoded display name, address) pairs from an address header.

        The domain part of each address is lowercased.  Garbage yields
        whatever email.utils could make of it, never an exception.
        """
        cache = self.__dict__.setdefault("_address_cache", {})
        key = name.lower()
        if key in cache:
            return cache[key]
        result = parse_addresses(self.header_raw(name))
        cache[key] = result
        return result

    @cached_property
    def subject(self) -> str:
        """Decoded Subject, "" when missing."""
        return self.header("Subject") or ""

    @cached_property
    def from_addr(self) -> str:
        """First address of From, "" when none."""
        found = self.addresses("From")
        return found[0][1] if found else ""

    @cached_property
    def from_name(self) -> str:
        """Display name of the first From address."""
        found = self.addresses("From")
        return found[0][0] if found else ""

    @cached_property
    def from_domain(self) -> str:
        """Lowercased domain of from_addr, "" when it has none."""
        local, at, domain = self.from_addr.rpartition("@")
        return domain.lower().rstrip(".") if at else ""

    @cached_property
    def message_id(self) -> str:
        """Message-ID without angle brackets, "" when missing."""
        value = self.header("Message-ID")
        if not value:
            return ""
        match = _ANGLE_ID.search(value)
        return (match.group(1) if match else value).strip()

    # -- MIME --------------------------------------------------------------

    @cached_property
    def _walk(self) -> MimeWalker:
        walker = MimeWalker(self._defects, self._scan_truncated)
        pairs = [(header.name, header.raw) for header in self.headers]
        walker.entity(pairs, self._body, 0, "text/plain", True)
        if is_multipart(pairs) and not self.has_header("MIME-Version"):
            walker.defect(MIME_MISSING_VERSION)
        return walker

    @property
    def defects(self) -> list[str]:
        """Symbolic names of everything malformed found (see DEFECTS).

        Reading this runs the MIME walk, since most defects are found there.
        """
        return self._walk.defects

    @property
    def parts(self) -> list[Part]:
        """Leaf MIME parts in document order."""
        return self._walk.parts

    @cached_property
    def attachments(self) -> list[Part]:
        """Parts that are attachments (see Part.is_attachment)."""
        return [part for part in self.parts if part.is_attachment]

    # -- text --------------------------------------------------------------

    @cached_property
    def _rendered(self) -> tuple[str, str, str, bool, dict[int, str]]:
        """(text, rawbody, html, capped, reduced HTML text by part index)."""
        cap = self._max_text_chars
        skip = self._walk.html_alternatives
        text_chunks: list[str] = []
        raw_chunks: list[str] = []
        html_chunks: list[str] = []
        reduced: dict[int, str] = {}
        text_len = raw_len = html_len = 0
        for index, part in enumerate(self.parts):
            body = part.text
            if body is None:
                continue
            if raw_len <= cap:
                raw_chunks.append(body)
                raw_len += len(body) + 1
            if part.is_html:
                if html_len <= cap:
                    html_chunks.append(body)
                    html_len += len(body) + 1
                if index in skip or text_len > cap:
                    continue
                body = html_to_text(body[:cap])
                reduced[index] = body
            elif text_len > cap:
                continue
            text_chunks.append(body)
            text_len += len(body) + 1
        text = "\n".join(text_chunks)
        rawbody = "\n".join(raw_chunks)
        html = "\n".join(html_chunks)
        capped = False
        if len(text) > cap:
            text, capped = text[:cap], True
        if len(rawbody) > cap:
            rawbody, capped = rawbody[:cap], True
        if len(html) > cap:
            html, capped = html[:cap], True
        return text, rawbody, html, capped, reduced

    @property
    def text(self) -> str:
        """Body text for body rules: text parts plus HTML reduced to text."""
        return self._rendered[0]

    @property
    def rawbody(self) -> str:
        """Decoded text parts with HTML markup kept."""
        return self._rendered[1]

    @property
    def html(self) -> str:
        """Raw HTML of all HTML parts, "" when there is none."""
        return self._rendered[2]

    @property
    def truncated(self) -> bool:
        """True when only a prefix was scanned or text was capped.

        Reading this renders the text, since the cap is only known then.
        """
        return self._scan_truncated or self._rendered[3]

    @cached_property
    def attached_links(self):
        """Links carried by PDF parts and QR codes in images (mail/attached.py), bounded by link_limits."""
        if not self.link_limits.enabled:
            return []
        html = [part.text for part in self.parts if part.is_html and part.text]
        return attached_links(self.parts, html, self.link_limits)

    @cached_property
    def urls(self) -> list[Url]:
        """URLs from text and HTML parts, then those of PDF links and QR codes
        (source "pdf", "qr"), then the targets of redirects and link wrappers among them
        (source "redirect"), deduplicated by (url, text), capped."""
        cap = self._max_text_chars
        reduced = self._rendered[4]
        seen: set[tuple[str, str | None]] = set()
        urls: list[Url] = []

        def add(url: Url | None) -> bool:
            if url is not None and (url.url, url.text) not in seen:
                seen.add((url.url, url.text))
                urls.append(url)
            return len(urls) >= MAX_URLS

        for index, part in enumerate(self.parts):
            if part.text is None:
                continue
            if part.is_html:
                for _tag, href, link_text in extract_links(part.text[:cap]):
                    if add(make_url(href, link_text, "html")):
                        return urls
                prose = reduced.get(index, "")
            else:
                prose = part.text[:cap]
            for url in find_text_urls(prose, MAX_URLS):
                if add(url):
                    return urls
        for link in self.attached_links:
            found = make_url(link.url, None, link.source)
            if found is not None and found.host and add(found):
                return urls
        # Where redirects and link wrappers send the reader (source "redirect"): the target is
        # judged as if it were linked, and a wrapper's own host (a security gateway) tells little.
        for url in list(urls):
            if url.scheme not in ("http", "https") or "?" not in url.url and "/__" not in url.url and "/amp/" not in url.url:
                continue
            target_url = url.url
            for _depth in range(2):  # a wrapper around a redirect: two levels
                target = redirect_target(target_url)
                if not target:
                    break
                found = make_url(target, None, "redirect")
                if found is None or not found.host or found.host == url.host:
                    break
                if add(found):
                    return urls
                target_url = found.url
        return urls


# Cached values computed from the header fields alone, which with_body may carry over.
_HEADER_DERIVED = ("_header_index", "subject", "from_addr", "from_name", "from_domain", "message_id")
