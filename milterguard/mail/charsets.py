"""Charsets: resolving a declared charset to a codec, decoding text bytes
with a guess where the label is missing or wrong, and RFC 2047 encoded words
in header values.  Nothing here raises on bad input.
"""

from __future__ import annotations

import binascii
import codecs
import re

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


def b64_best_effort(data: bytes) -> bytes:
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
        return b64_best_effort(data)


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
