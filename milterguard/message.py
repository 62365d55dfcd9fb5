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

import binascii
import codecs
import email.utils
import re
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from milterguard.htmltext import extract_links, html_to_text
from milterguard.urls import Url, find_text_urls, make_url

__all__ = [
    "DEFECTS",
    "Header",
    "Message",
    "Part",
    "Url",
    "decode_bytes",
    "decode_header_value",
    "parse_params",
]

MAX_DEPTH = 20
MAX_PARTS = 1000
MAX_URLS = 500

# Defect names; rules refer to these, so they are spelled in one place.
MIME_BAD_BOUNDARY = "MIME_BAD_BOUNDARY"
MIME_BAD_BASE64 = "MIME_BAD_BASE64"
MIME_BAD_CHARSET = "MIME_BAD_CHARSET"
MIME_MISSING_VERSION = "MIME_MISSING_VERSION"
MIME_TOO_DEEP = "MIME_TOO_DEEP"
MIME_TOO_MANY_PARTS = "MIME_TOO_MANY_PARTS"
HEADER_8BIT = "HEADER_8BIT"
HEADER_NO_COLON = "HEADER_NO_COLON"
DEFECTS = frozenset({
    MIME_BAD_BOUNDARY, MIME_BAD_BASE64, MIME_BAD_CHARSET, MIME_MISSING_VERSION,
    MIME_TOO_DEEP, MIME_TOO_MANY_PARTS, HEADER_8BIT, HEADER_NO_COLON,
})


# --------------------------------------------------------------------------
# Data classes (the public interface)


@dataclass(slots=True)
class Header:
    """One header field: name as received, unfolded raw value, decoded value."""

    name: str
    raw: str
    value: str


@dataclass
class Part:
    """One leaf MIME part (multipart containers are not parts)."""

    content_type: str
    charset: str
    filename: str
    disposition: str
    transfer_encoding: str
    size: int
    payload: bytes
    text: str | None
    is_html: bool
    is_attachment: bool
    depth: int


# --------------------------------------------------------------------------
# Charsets

# Names that say "no usable charset" rather than naming an unknown one:
# they get the utf-8 then cp1252 guess, without a MIME_BAD_CHARSET defect.
# us-ascii is here because 8-bit text labelled us-ascii is very common
# and is nearly always utf-8 or windows-1252.
_GUESS_CHARSETS = frozenset({
    "", "us-ascii", "ascii", "us_ascii", "ansi_x3.4-1968", "iso646-us",
    "x-unknown", "unknown", "unknown-8bit", "x-user-defined", "default",
    "none", "7bit", "8bit",
})
# Supersets and misspellings seen in real mail.  Latin-1 is read as
# windows-1252 as browsers do (WHATWG Encoding), so 0x80-0x9f become the
# quotes and dashes the sender meant instead of C1 controls.
_CHARSET_ALIASES = {
    "latin-1": "cp1252",
    "iso8859-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ksc5601": "cp949",
    "ks_c_5601-1989": "cp949",
    "euc-kr": "cp949",
    "x-sjis": "cp932",
    "shift-jis": "cp932",
    "shift_jis": "cp932",
    "sjis": "cp932",
    "iso-8859-8-i": "iso8859-8",
    "iso-8859-6-i": "iso8859-6",
    "windows-874": "cp874",
    "tis-620": "cp874",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "unicode-1-1-utf-7": "utf-7",
    "x-euc-jp": "euc_jp",
    "x-euc": "euc_jp",
}
# Codecs that exist in Python but must never decode mail: they only work
# with errors="strict" or are not charsets at all.
_UNUSABLE_CODECS = frozenset({"idna", "punycode", "undefined", "raw-unicode-escape", "unicode-escape"})
_charset_cache: dict[str, tuple[str | None, bool]] = {}
_CHARSET_CACHE_MAX = 512


def _resolve_charset(name: str) -> tuple[str | None, bool]:
    """Map a declared charset to (Python codec or None to guess, known?)."""
    cached = _charset_cache.get(name)
    if cached is not None:
        return cached
    clean = name.strip(" \t\"';").lower()
    result: tuple[str | None, bool]
    if clean in _GUESS_CHARSETS:
        result = (None, True)
    else:
        codec = _CHARSET_ALIASES.get(clean, clean)
        try:
            info = codecs.lookup(codec)
        except (LookupError, ValueError):  # ValueError: a NUL in the name
            result = (None, False)
        else:
            # _is_text_encoding is False for base64, zlib, rot13 ...
            if not getattr(info, "_is_text_encoding", True) or info.name in _UNUSABLE_CODECS:
                result = (None, False)
            elif info.name in ("latin-1", "iso8859-1"):
                result = ("cp1252", True)
            elif info.name == "ascii":
                result = (None, True)
            else:
                result = (info.name, True)
    if len(_charset_cache) < _CHARSET_CACHE_MAX:
        # Bounded: charset names are attacker-chosen.
        _charset_cache[name] = result
    return result


def _guess_decode(data: bytes) -> str:
    """Decode bytes of unknown charset: utf-8 if valid, else windows-1252."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_bytes(data: bytes, charset: str) -> tuple[str, bool]:
    """Decode `data` declared as `charset`; never raises.

    Returns (text, charset_is_bad).  Unknown or undeclared charsets are
    decoded as utf-8 when valid, else as windows-1252; undecodable bytes
    become U+FFFD.
    """
    codec, known = _resolve_charset(charset)
    if codec is None:
        return _guess_decode(data), not known
    try:
        text = data.decode(codec, "replace")
        if codec == "utf-7":
            # "+3AE-" decodes to a lone surrogate even with "replace"; such text cannot be
            # encoded again (the regex engine, logs, headers), so it becomes U+FFFD.
            text = _LONE_SURROGATE.sub("\ufffd", text)
        return text, False
    except (UnicodeError, LookupError, ValueError):
        # A few CJK codecs reject some malformed input even with "replace".
        return _guess_decode(data), False


# --------------------------------------------------------------------------
# Header decoding

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_B64_KEEP = re.compile(rb"[^A-Za-z0-9+/]")


def _b64_best_effort(data: bytes) -> bytes:
    """Decode base64 while ignoring junk, padding and a dangling tail."""
    clean = _B64_KEEP.sub(b"", data)
    clean = clean[: len(clean) - len(clean) % 4]
    try:
        return binascii.a2b_base64(clean)
    except binascii.Error:
        return b""


def _decode_b_word(text: str) -> bytes:
    """RFC 2047 4.1 "B" encoding, tolerant of missing padding."""
    data = text.encode("ascii", "ignore")
    data = data.replace(b" ", b"")
    data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        return _b64_best_effort(data)


def decode_header_value(raw: str) -> tuple[str, bool]:
    """Decode RFC 2047 encoded-words in an unfolded header value.

    Returns (value, had_bad_charset).  Adjacent encoded-words in the same
    charset are joined before decoding, so a multibyte character split
    across two words survives; whitespace between encoded-words is dropped
    (RFC 2047 6.2).  Never raises.
    """
    if "=?" not in raw:
        return raw, False
    chunks: list[str | list] = []  # plain text, or [charset, bytearray]
    bad = False
    pos = 0
    last_encoded = False
    for match in _ENCODED_WORD.finditer(raw):
        gap = raw[pos:match.start()]
        if gap and not (last_encoded and gap.isspace()):
            chunks.append(gap)
        charset = match.group(1).partition("*")[0].lower()  # RFC 2231 5: "utf-8*en"
        encoded = match.group(3)
        if match.group(2) in "Bb":
            data = _decode_b_word(encoded)
        else:
            data = binascii.a2b_qp(encoded.encode("utf-8", "replace"), header=True)
        if chunks and isinstance(chunks[-1], list) and chunks[-1][0] == charset:
            chunks[-1][1] += data
        else:
            chunks.append([charset, bytearray(data)])
        pos = match.end()
        last_encoded = True
    if pos == 0:
        return raw, False
    chunks.append(raw[pos:])
    out = []
    for chunk in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            text, chunk_bad = decode_bytes(bytes(chunk[1]), chunk[0])
            bad = bad or chunk_bad
            out.append(text)
    return "".join(out), bad


def _clean_str(value: str) -> str:
    """Replace bytes that were not UTF-8 (surrogate escapes) by U+FFFD."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        # Lone surrogates that did not come from surrogateescape.
        return value.encode("utf-8", "replace").decode("utf-8", "replace")


def _join_folded(value: str) -> str:
    """Join folded lines: each line break with the blanks around it -> one space.

    split/strip/join is used instead of a regex: a pattern that may start
    with blanks is tried by sre at every position and costs ~10x more.
    """
    return " ".join(filter(None, [piece.strip(" \t\r") for piece in value.split("\n")]))


def _unfold(value: str) -> str:
    """RFC 5322 2.2.3 unfolding of an MTA-supplied value, leading blanks dropped."""
    if "\n" in value:
        value = _join_folded(value)
    return value.lstrip(" \t").rstrip("\r\n")


# --------------------------------------------------------------------------
# Header blocks and parameters

# RFC 5322 2.2: field name is printable ASCII except ":"; blanks before the
# colon ("Subject : x") are tolerated as most MUAs do.  One match takes a
# whole field including its continuation lines.
_HEADER_FIELD = re.compile(r"([!-9;-~]+)[ \t]*:(.*(?:\n[ \t].*)*)")
_HEADER_START = re.compile(r"[!-9;-~]+[ \t]*:")


def _parse_header_block(
    block: str, lenient: bool
) -> tuple[list[tuple[str, str]], str | None, bool]:
    """Split a decoded header block into (name, unfolded raw value) pairs.

    Returns (pairs, rest, malformed).  `rest` is the text from the first
    line that is not a header, which is where the body really starts when
    the blank separator line is missing, or None.  With `lenient` (top
    level), a malformed line followed by a header line is skipped instead,
    since a stray line inside a header block is far more common than a
    header block ending without a blank line right before another header.
    """
    pairs: list[tuple[str, str]] = []
    malformed = False
    match_field = _HEADER_FIELD.match
    pos = 0
    size = len(block)
    while pos < size:
        match = match_field(block, pos)
        if match is not None:
            name, value = match.group(1, 2)
            if "\n" in value:
                value = _join_folded(value)
            pairs.append((name, value.lstrip(" \t").rstrip("\r")))
            pos = match.end() + 1
            continue
        line_end = block.find("\n", pos)
        if line_end < 0:
            line_end = size
        if line_end == pos:  # empty line
            pos += 1
            continue
        malformed = True
        if block[pos] in " \t":
            # Continuation with no field to continue: before the first
            # header, or after a skipped malformed line.
            if not lenient:
                return pairs, block[pos:], True
            pos = line_end + 1
            continue
        if lenient and line_end < size:
            following = block[line_end + 1:line_end + 2]
            if following and (following in " \t" or _HEADER_START.match(block, line_end + 1)):
                pos = line_end + 1
                continue
        return pairs, block[pos:], True
    return pairs, None, malformed


def _split_entity(data: bytes, lenient: bool) -> tuple[list[tuple[str, str]], bytes, bool, bool]:
    """Split LF-normalised entity bytes into header pairs and body.

    Returns (pairs, body, malformed, eight_bit).  Header values still carry
    surrogate escapes for non-UTF-8 bytes.
    """
    if data.startswith(b"\n"):
        return [], data[1:], False, False
    end = data.find(b"\n\n")
    if end < 0:
        block, body, separated = data, b"", False
    else:
        block, body, separated = data[:end], data[end + 2:], True
    eight_bit = not block.isascii()
    text = block.decode("utf-8", "surrogateescape") if eight_bit else block.decode("ascii")
    pairs, rest, malformed = _parse_header_block(text, lenient)
    if rest is not None:
        body = rest.encode("utf-8", "surrogateescape") + (b"\n\n" + body if separated else b"")
    return pairs, body, malformed, eight_bit


# name=value, value quoted (with backslash escapes, maybe unclosed) or bare.
# The look-behind and possessive name keep a long run without "=" linear:
# without them every position inside the run would rescan it.
_PARAM = re.compile(r'(?<![^\s;"])([^\s=;"]++)\s*=\s*("(?:[^"\\]|\\.)*+"?|[^;]*)', re.S)
_MAIN_VALUE = re.compile(r"\s*([^;\s]*)\s*;?")
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)


def parse_params(value: str) -> tuple[str, dict[str, str], bool]:
    """Parse a Content-Type/Disposition value into (main value, params, bad).

    The main value is lowercased; parameter names are lowercased, values
    are unquoted, and RFC 2231 continuations and charset-encoded values are
    reassembled and decoded.  `bad` is True when an RFC 2231 charset was
    unknown.  Tolerates missing semicolons and unclosed quotes.
    """
    head = _MAIN_VALUE.match(value)
    main = head.group(1).strip("\"'").lower() if head else ""
    params: dict[str, str] = {}
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    for match in _PARAM.finditer(value, head.end() if head else 0):
        name = match.group(1).lower()
        raw = match.group(2)
        if raw.startswith('"'):
            raw = raw[1:-1] if len(raw) > 1 and raw.endswith('"') else raw[1:]
            if "\\" in raw:
                raw = _QUOTED_PAIR.sub(r"\1", raw)
        else:
            raw = raw.strip().strip("\"'")
        if "*" in name:
            # RFC 2231 3 and 4: name*=charset'lang'value, name*0*=, name*1=
            base, _, section = name.partition("*")
            encoded = section.endswith("*") or section == ""
            number = section.rstrip("*")
            if number and not (number.isdigit() and len(number) <= 3):
                continue
            sections.setdefault(base, []).append((int(number) if number else 0, encoded, raw))
        elif name not in params:
            params[name] = raw
    bad = False
    for base, pieces in sections.items():
        pieces.sort(key=lambda piece: piece[0])
        charset = ""
        buffer = bytearray()
        for index, (_number, encoded, raw) in enumerate(pieces):
            if encoded:
                if index == 0 and raw.count("'") >= 2:
                    charset, _lang, raw = raw.split("'", 2)
                buffer += unquote_to_bytes(raw)
            else:
                buffer += raw.encode("utf-8", "surrogateescape")
        text, charset_bad = decode_bytes(bytes(buffer), charset)
        bad = bad or (charset_bad and charset != "")
        # RFC 2231 4: the extended form wins over a plain one.
        params[base] = text
    return main, params, bad


# --------------------------------------------------------------------------
# MIME tree walk

_B64_SEGMENT = re.compile(rb"[^=]+=*")


def _decode_b64_segment(segment: bytes) -> bytes:
    """Decode one padded base64 segment, best effort."""
    try:
        return binascii.a2b_base64(segment)
    except binascii.Error:
        return _b64_best_effort(segment)


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\t\r "


class _MimeWalker:
    """Splits an LF-normalised body into leaf Parts, collecting defects."""

    def __init__(self, defects: list[str], truncated: bool) -> None:
        self.defects = defects
        self.truncated = truncated
        self.parts: list[Part] = []
        # Indexes of HTML parts that have a text/plain sibling in a
        # multipart/alternative: their text would duplicate it.
        self.html_alternatives: set[int] = set()
        self.full = False
        self.in_message = False

    def defect(self, name: str) -> None:
        """Record a defect once."""
        if name not in self.defects:
            self.defects.append(name)

    def entity(self, pairs: list[tuple[str, str]], body: bytes, depth: int,
               default_type: str, at_end: bool) -> None:
        """Walk one entity; `at_end` says its body runs to the scan limit."""
        if len(self.parts) >= MAX_PARTS:
            if not self.full:
                self.full = True
                self.defect(MIME_TOO_MANY_PARTS)
            return
        ctype_raw = cte = cdisp = None
        for name, value in pairs:
            if len(name) > 8 and name[:8].lower() == "content-":
                lname = name.lower()
                if lname == "content-type" and ctype_raw is None:
                    ctype_raw = value
                elif lname == "content-transfer-encoding" and cte is None:
                    cte = value
                elif lname == "content-disposition" and cdisp is None:
                    cdisp = value
        if ctype_raw is not None:
            ctype, params, bad = parse_params(_clean_str(ctype_raw) if not ctype_raw.isascii() else ctype_raw)
            if bad:
                self.defect(MIME_BAD_CHARSET)
            if "/" not in ctype or ctype.startswith("/") or ctype.endswith("/"):
                # RFC 2045 5.2: an invalid Content-Type means text/plain.
                ctype = "text/plain"
                params = {}
        else:
            ctype, params = default_type, {}
        if ctype.startswith("multipart/"):
            if depth >= MAX_DEPTH:
                self.defect(MIME_TOO_DEEP)
                self.leaf(ctype, params, cte, cdisp, body, depth, at_end)
                return
            if self.multipart(ctype, params, body, depth, at_end):
                return
            # No usable boundary: show the body to text rules as plain text.
            ctype = "text/plain"
        self.leaf(ctype, params, cte, cdisp, body, depth, at_end)

    def multipart(self, ctype: str, params: dict[str, str], body: bytes,
                  depth: int, at_end: bool) -> bool:
        """Split a multipart body; False when it has no usable boundary."""
        boundary = params.get("boundary", "")
        if not boundary:
            self.defect(MIME_BAD_BOUNDARY)
            return False
        delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
        first = self._find_delimiter(body, delimiter, 0)
        if first is None:
            self.defect(MIME_BAD_BOUNDARY)
            return False
        start_index = len(self.parts)
        child_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        _pos, line_end, closed = first
        while not closed:
            chunk_start = line_end + 1
            found = self._find_delimiter(body, delimiter, chunk_start)
            if found is None:
                chunk = body[chunk_start:]
                last = True
            else:
                # The LF before a delimiter belongs to it (RFC 2046 5.1.1).
                chunk = body[chunk_start:max(chunk_start, found[0] - 1)]
                last = False
            child_pairs, child_body, _malformed, _eight = _split_entity(chunk, lenient=False)
            self.entity(child_pairs, child_body, depth + 1, child_type, at_end and last)
            if found is None:
                if not (self.truncated and at_end):
                    self.defect(MIME_BAD_BOUNDARY)  # no closing delimiter
                break
            _pos, line_end, closed = found
            if self.full:
                break
        if ctype == "multipart/alternative":
            children = self.parts[start_index:]
            if any(part.content_type == "text/plain" and not part.is_attachment for part in children):
                for offset, part in enumerate(children):
                    if part.is_html:
                        self.html_alternatives.add(start_index + offset)
        return True

    @staticmethod
    def _find_delimiter(body: bytes, delimiter: bytes, start: int) -> tuple[int, int, bool] | None:
        """Next delimiter line at or after start: (pos, end of line, closing)."""
        size = len(delimiter)
        while True:
            pos = body.find(delimiter, start)
            if pos < 0:
                return None
            if pos == 0 or body[pos - 1] == 10:
                line_end = body.find(b"\n", pos + size)
                if line_end < 0:
                    line_end = len(body)
                rest = body[pos + size:line_end]
                # RFC 2046 5.1.1: only blanks may follow a delimiter; a longer
                # boundary that merely starts with this one is not a match.
                if rest.startswith(b"--"):
                    return pos, line_end, True
                if not rest.strip():
                    return pos, line_end, False
            start = pos + 1

    def leaf(self, ctype: str, params: dict[str, str], cte: str | None, cdisp: str | None,
             body: bytes, depth: int, at_end: bool) -> None:
        """Decode one leaf part and append it."""
        encoding = cte.strip(" \t\"'").lower() if cte else ""
        if encoding == "base64":
            payload = self._base64(body, at_end)
        elif encoding == "quoted-printable":
            payload = binascii.a2b_qp(body)
        else:
            payload = body
        disposition = ""
        filename = ""
        if cdisp is not None:
            disp, disp_params, bad = parse_params(_clean_str(cdisp) if not cdisp.isascii() else cdisp)
            if bad:
                self.defect(MIME_BAD_CHARSET)
            if disp in ("attachment", "inline"):
                disposition = disp
            filename = disp_params.get("filename", "")
        if not filename:
            filename = params.get("name", "")
        if "=?" in filename:
            filename, bad = decode_header_value(filename)
            if bad:
                self.defect(MIME_BAD_CHARSET)
        charset = params.get("charset", "").strip(" \t\"'").lower()
        maintype = ctype.partition("/")[0]
        text = None
        if maintype == "text":
            text, bad = decode_bytes(payload, charset)
            if bad:
                self.defect(MIME_BAD_CHARSET)
        self.parts.append(Part(
            content_type=ctype,
            charset=charset,
            filename=filename,
            disposition=disposition,
            transfer_encoding=encoding,
            size=len(payload),
            payload=payload,
            text=text,
            is_html=ctype == "text/html",
            is_attachment=(disposition == "attachment" or bool(filename)
                           or maintype not in ("text", "multipart")),
            depth=depth,
        ))
        if ctype == "message/rfc822" and not self.in_message and depth < MAX_DEPTH:
            # Descend one level only, so that the text of a forwarded or
            # wrapped message reaches body rules; deeper ones stay opaque.
            self.in_message = True
            if b"\r\n" in payload:
                payload = payload.replace(b"\r\n", b"\n")
            inner_pairs, inner_body, _malformed, _eight = _split_entity(payload, lenient=True)
            self.entity(inner_pairs, inner_body, depth + 1, "text/plain", at_end)
            self.in_message = False

    def _base64(self, body: bytes, at_end: bool) -> bytes:
        """Decode a base64 body, best effort, flagging invalid input."""
        junk = body.translate(None, _B64_ALPHABET)
        pad = body.find(b"=")
        if pad >= 0 and body[pad:].strip(b"=\r\n\t "):
            # RFC 2045 6.8 allows "=" only at the end, and binascii stops
            # there, but MUAs decode on: data hidden after a mid-stream pad
            # must reach the filters too.
            self.defect(MIME_BAD_BASE64)
            return b"".join(_decode_b64_segment(segment) for segment in _B64_SEGMENT.findall(body))
        try:
            payload = binascii.a2b_base64(body)
        except binascii.Error:
            payload = _b64_best_effort(body)
            if not (self.truncated and at_end):
                self.defect(MIME_BAD_BASE64)
            return payload
        if junk:
            self.defect(MIME_BAD_BASE64)
        return payload


# --------------------------------------------------------------------------
# Message

_ANGLE_ID = re.compile(r"<([^<>]*)>")
_MAX_ADDRESS_CHARS = 16 * 1024
_MAX_ADDRESS_HEADERS = 100  # of one name: 3,000 From or To headers took 0.5 s to parse
_BARE_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
# The shapes most address headers have: one address, bare or in angle brackets after a
# quoted or plain display name.  `simple_addresses` reads them without the email
# package's general parser (pure Python, tens of microseconds a header); anything else,
# comments, groups, lists and escapes included, still goes to email.utils.getaddresses.
_ATOM_ADDR = r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_SIMPLE_ADDRESS = re.compile(
    r'[ \t]*(?:"([^"\\\r\n]*)"[ \t]*|([A-Za-z0-9 \t]*?)[ \t]*)<' + _ATOM_ADDR + r'>[ \t]*'
    r"|[ \t]*" + _ATOM_ADDR + r"[ \t]*")


def simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """getaddresses([VALUE]) for a single plain address, or None for anything else."""
    m = _SIMPLE_ADDRESS.fullmatch(value)
    if m is None:
        return None
    quoted, plain, bracketed, bare = m.groups()
    if bare is not None:
        address = bare
        display = ""
    else:
        address = bracketed
        display = quoted if quoted is not None else " ".join(plain.split())
    if ".." in address or address.startswith(".") or "." + "@" in address or "@." in address:
        return None  # the general parser has its own ideas about dots
    return [(display, address)]


def _scanned_body(body, body_size: int | None, max_scan_bytes: int) -> tuple[bytes, bool, int]:
    """(the part of BODY that is scanned, with LF line ends; whether it was cut; the full body size).

    BODY is bytes or a file read from 0; BODY_SIZE, when known, is the size the MTA sent.
    """
    data, known_size = _read_body(body, max_scan_bytes)
    data, truncated = _limit(data, max_scan_bytes)
    if body_size is None:
        body_size = known_size if known_size is not None else len(data)
    if b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")
    return data, truncated, body_size


def _read_body(body: BinaryIO | bytes, limit: int) -> tuple[bytes, int | None]:
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


def _limit(data: bytes, limit: int) -> tuple[bytes, bool]:
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
                 defects: list[str], max_text_chars: int) -> None:
        self.headers = headers
        self.size = size
        self._defects = defects
        self._body = body
        self._scan_truncated = scan_truncated
        self._max_text_chars = max_text_chars
        self._header_parse: tuple[int, int, tuple[str, ...]] | None = None  # set by from_parts

    # -- construction ------------------------------------------------------

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_scan_bytes: int = 10 * 1024 * 1024,
                   max_text_chars: int = 512 * 1024) -> "Message":
        """Parse a whole RFC 5322 message (CRLF or LF; an mbox "From " line is skipped)."""
        if raw.startswith(b"From "):
            newline = raw.find(b"\n")
            raw = raw[newline + 1:] if newline >= 0 else b""
        size = len(raw)
        data, truncated = _limit(raw, max_scan_bytes)
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        pairs, body, malformed, eight_bit = _split_entity(data, lenient=True)
        defects: list[str] = []
        if eight_bit:
            defects.append(HEADER_8BIT)
        if malformed:
            defects.append(HEADER_NO_COLON)
        headers = _make_headers(pairs, defects)
        return cls(headers, body, size=size, scan_truncated=truncated, defects=defects,
                   max_text_chars=max_text_chars)

    @classmethod
    def from_parts(cls, headers: list[tuple[str, str]], body: BinaryIO | bytes, *,
                   body_size: int | None = None, max_scan_bytes: int = 10 * 1024 * 1024,
                   max_text_chars: int = 512 * 1024) -> "Message":
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
            pairs.append((name, _unfold(value)))
        if eight_bit:
            defects.append(HEADER_8BIT)
        data, truncated, body_size = _scanned_body(body, body_size, max_scan_bytes)
        parsed = _make_headers(pairs, defects)
        msg = cls(parsed, data, size=header_bytes + body_size, scan_truncated=truncated, defects=defects,
                  max_text_chars=max_text_chars)
        # What with_body needs to reuse this header parse (the defects before any MIME walk).
        msg._header_parse = (len(headers), header_bytes, tuple(defects))
        return msg

    def with_body(self, body: BinaryIO | bytes, *, body_size: int | None = None,
                  max_scan_bytes: int = 10 * 1024 * 1024, max_text_chars: int = 512 * 1024) -> "Message":
        """This message's headers with BODY: what from_parts would build from the same headers.

        For a message built by from_parts (the headers alone, at end of headers): the
        header fields, their index and the values derived from headers only (addresses,
        Subject, From, Message-ID) are reused instead of parsed again; nothing derived
        from this message's body is.
        """
        _, header_bytes, header_defects = self._header_parse
        data, truncated, body_size = _scanned_body(body, body_size, max_scan_bytes)
        msg = type(self)(self.headers, data, size=header_bytes + body_size, scan_truncated=truncated,
                         defects=list(header_defects), max_text_chars=max_text_chars)
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
        # email.utils parses in pure Python: bound the work on huge headers.
        values = [value[:_MAX_ADDRESS_CHARS] for value in self.header_raw(name)[:_MAX_ADDRESS_HEADERS]]
        result: list[tuple[str, str]] = []
        if values:
            try:
                found = simple_addresses(values[0]) if len(values) == 1 else None
                if found is None:
                    found = email.utils.getaddresses(values)
            except (IndexError, ValueError, TypeError, AttributeError, RecursionError):
                # Known crashers of the stdlib address parser on garbage;
                # RecursionError comes from deeply nested "(((" comments.
                found = [("", address) for value in values for address in _BARE_ADDRESS.findall(value)]
            for display, address in found:
                if not address and not display:
                    continue
                if "=?" in display:
                    display = decode_header_value(display)[0]
                local, at, domain = address.rpartition("@")
                if at:
                    address = f"{local}@{domain.lower()}"
                result.append((display, address))
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
    def _walk(self) -> _MimeWalker:
        walker = _MimeWalker(self._defects, self._scan_truncated)
        pairs = [(header.name, header.raw) for header in self.headers]
        walker.entity(pairs, self._body, 0, "text/plain", True)
        if _is_multipart(pairs) and not self.has_header("MIME-Version"):
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
    def urls(self) -> list[Url]:
        """URLs from text and HTML parts, deduplicated by (url, text), capped."""
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
        return urls


# Cached values computed from the header fields alone, which with_body may carry over.
_HEADER_DERIVED = ("_header_index", "subject", "from_addr", "from_name", "from_domain", "message_id")


def _is_multipart(pairs: list[tuple[str, str]]) -> bool:
    """True when the first Content-Type of `pairs` is multipart/*."""
    for name, value in pairs:
        if name.lower() == "content-type":
            return value.lstrip(" \t\"'")[:10].lower() == "multipart/"
    return False


def _make_headers(pairs: list[tuple[str, str]], defects: list[str]) -> list[Header]:
    """Build Header objects, cleaning non-UTF-8 bytes and decoding RFC 2047."""
    headers = []
    bad_charset = False
    for name, raw in pairs:
        if not raw.isascii():
            raw = _clean_str(raw)
        if not name.isascii():
            name = _clean_str(name)
        if "=?" in raw:
            value, bad = decode_header_value(raw)
            bad_charset = bad_charset or bad
        else:
            value = raw
        headers.append(Header(name, raw, value))
    if bad_charset:
        defects.append(MIME_BAD_CHARSET)
    return headers
