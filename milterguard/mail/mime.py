"""The MIME walker: splits an LF-normalised body into leaf parts, decoding
transfer encodings and text, bounded in depth (MAX_DEPTH) and parts
(MAX_PARTS), and noting what is malformed as defects instead of raising.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

from milterguard.mail.charsets import b64_best_effort, decode_bytes, decode_header_value
from milterguard.mail.defects import (
    MIME_BAD_BASE64, MIME_BAD_BOUNDARY, MIME_BAD_CHARSET, MIME_TOO_DEEP, MIME_TOO_MANY_PARTS,
)
from milterguard.mail.headers import clean_str, parse_params, split_entity

MAX_DEPTH = 20
MAX_PARTS = 1000


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




_B64_SEGMENT = re.compile(rb"[^=]+=*")


def _decode_b64_segment(segment: bytes) -> bytes:
    """Decode one padded base64 segment, best effort."""
    try:
        return binascii.a2b_base64(segment)
    except binascii.Error:
        return b64_best_effort(segment)


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\t\r "


class MimeWalker:
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
            ctype, params, bad = parse_params(clean_str(ctype_raw) if not ctype_raw.isascii() else ctype_raw)
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
            child_pairs, child_body, _malformed, _eight = split_entity(chunk, lenient=False)
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
            disp, disp_params, bad = parse_params(clean_str(cdisp) if not cdisp.isascii() else cdisp)
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
            inner_pairs, inner_body, _malformed, _eight = split_entity(payload, lenient=True)
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
            payload = b64_best_effort(body)
            if not (self.truncated and at_end):
                self.defect(MIME_BAD_BASE64)
            return payload
        if junk:
            self.defect(MIME_BAD_BASE64)
        return payload



def is_multipart(pairs: list[tuple[str, str]]) -> bool:
    """True when the first Content-Type of `pairs` is multipart/*."""
    for name, value in pairs:
        if name.lower() == "content-type":
            return value.lstrip(" \t\"'")[:10].lower() == "multipart/"
    return False

