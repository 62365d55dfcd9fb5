"""Header fields: the Header record, unfolding (RFC 5322 2.2.3), splitting a
header block from its body, and the parameters of Content-Type and
Content-Disposition (with RFC 2231 continuations).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from milterguard.mail.charsets import decode_bytes, decode_header_value
from milterguard.mail.defects import MIME_BAD_CHARSET


@dataclass(slots=True)
class Header:
    """One header field: name as received, unfolded raw value, decoded value."""

    name: str
    raw: str
    value: str


def clean_str(value: str) -> str:
    """Replace bytes that were not UTF-8 (surrogate escapes) by U+FFFD."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        # Lone surrogates that did not come from surrogateescape.
        return value.encode("utf-8", "replace").decode("utf-8", "replace")


def join_folded(value: str) -> str:
    """Join folded lines: each line break with the blanks around it -> one space.

    split/strip/join is used instead of a regex: a pattern that may start
    with blanks is tried by sre at every position and costs ~10x more.
    """
    return " ".join(filter(None, [piece.strip(" \t\r") for piece in value.split("\n")]))


def unfold(value: str) -> str:
    """RFC 5322 2.2.3 unfolding of an MTA-supplied value, leading blanks dropped."""
    if "\n" in value:
        value = join_folded(value)
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
                value = join_folded(value)
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


def split_entity(data: bytes, lenient: bool) -> tuple[list[tuple[str, str]], bytes, bool, bool]:
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



def make_headers(pairs: list[tuple[str, str]], defects: list[str]) -> list[Header]:
    """Build Header objects, cleaning non-UTF-8 bytes and decoding RFC 2047."""
    headers = []
    bad_charset = False
    for name, raw in pairs:
        if not raw.isascii():
            raw = clean_str(raw)
        if not name.isascii():
            name = clean_str(name)
        if "=?" in raw:
            value, bad = decode_header_value(raw)
            bad_charset = bad_charset or bad
        else:
            value = raw
        headers.append(Header(name, raw, value))
    if bad_charset:
        defects.append(MIME_BAD_CHARSET)
    return headers
