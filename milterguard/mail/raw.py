"""Messages as bytes: reading stored messages the way an MTA hands them to a
milter (`split_message`), and building the message again from what the milter
was given (`header_bytes`, `raw_message`, `message_stream`), for signature
checks and for clamd."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import BinaryIO, Iterator


def strip_mbox_from(raw: bytes) -> bytes:
    """Drop an mbox "From " separator line, which is not part of the message."""
    if raw.startswith(b"From "):
        nl = raw.find(b"\n")
        return raw[nl + 1:] if nl >= 0 else b""
    return raw


def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split a message into (name, value) header pairs and the body.

    As in Postfix's cleanup, the header section ends at the first empty
    line or at the first line that is not a header; a continuation line is
    kept in its header's value after a newline.  Values lose the one space
    after the colon, as milters are given them.
    """
    raw = strip_mbox_from(raw)
    headers: list[tuple[str, str]] = []
    pos = 0
    size = len(raw)
    while pos < size:
        nl = raw.find(b"\n", pos)
        end = size if nl < 0 else nl
        line = raw[pos:end]
        nxt = size if nl < 0 else nl + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            pos = nxt
            break
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line.decode("utf-8", "surrogateescape"))
            pos = nxt
            continue
        colon = line.find(b":")
        name = line[:colon] if colon > 0 else b""
        if colon <= 0 or not all(33 <= c <= 126 for c in name):
            break  # not a header: the body starts here
        value = line[colon + 1:]
        if value[:1] == b" ":
            value = value[1:]
        headers.append((name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
        pos = nxt
    return headers, raw[pos:]


def iter_message_files(paths: list[str]) -> Iterator[str]:
    """Files named, and the files in directories named (sorted, recursively); "-" is stdin."""
    for path in paths:
        if path == "-":
            yield "-"
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if not name.startswith("."):
                        yield os.path.join(root, name)
        else:
            yield path


def read_message(path: str) -> bytes:
    if path == "-":
        import sys

        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


# ---------------------------------------------------------------- building it again

_BARE_LF = re.compile(rb"(?<!\r)\n")


def header_bytes(headers: list[tuple[str, str]]) -> bytes:
    """The header section as received, CRLF line ends, with the blank line that ends it.

    Milters get header values without the one space after the colon and with
    continuation lines joined by a newline; this puts both back.
    """
    out = []
    for name, value in headers:
        value = value.replace("\r\n", "\n").replace("\n", "\r\n")
        sep = ":" if value[:1] in (" ", "\t", "\r") else ": "
        out.append(f"{name}{sep}{value}\r\n".encode("utf-8", "surrogateescape"))
    out.append(b"\r\n")
    return b"".join(out)


def edited_headers(headers: list[tuple[str, str]], edits) -> list[tuple[str, str]]:
    """HEADERS as the MTA has them once it made the milter's EDITS (a model.HeaderEdits):
    for a message the filter keeps itself instead of passing it on."""
    if edits is None:
        return list(headers)
    drop = set()
    for name, index in edits.remove:  # 1-based among the headers of that name
        places = [i for i, (other, _value) in enumerate(headers) if other.lower() == name.lower()]
        if 0 < index <= len(places):
            drop.add(places[index - 1])
    out = [header for i, header in enumerate(headers) if i not in drop]
    for header in edits.prepend:  # each goes on top of those before it, as the milter's addheader(.., 0)
        out.insert(0, header)
    out.extend(edits.add)
    if edits.subject is not None:
        at = next((i for i, (name, _value) in enumerate(out) if name.lower() == "subject"), None)
        if at is None:
            out.append(("Subject", edits.subject))
        else:
            out[at] = (out[at][0], edits.subject)
    return out


def body_bytes(body: BinaryIO | bytes | None) -> bytes:
    """The whole body: bytes as they are, or a spooled file read from its start
    (its position is left as it was)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if body is None:
        return b""
    pos = body.tell()
    try:
        body.seek(0)
        return body.read()
    finally:
        body.seek(pos)


def raw_message(headers: list[tuple[str, str]], body: BinaryIO | bytes | None) -> bytes:
    """The message as received, with CRLF line ends throughout (for DKIM and ARC)."""
    return header_bytes(headers) + _BARE_LF.sub(b"\r\n", body_bytes(body))


class MessageStream(io.RawIOBase):
    """The header section then the body, read in pieces without joining them,
    cut at LIMIT bytes (for streaming a large message to clamd)."""

    def __init__(self, headers: list[tuple[str, str]], body: BinaryIO | bytes | None, limit: int) -> None:
        head = header_bytes(headers)
        self._head = io.BytesIO(head)
        if body is None or isinstance(body, (bytes, bytearray, memoryview)):
            body_size = len(body or b"")
            self._body: BinaryIO = io.BytesIO(bytes(body or b""))
        else:
            body_size = body.seek(0, 2)
            body.seek(0)
            self._body = body
        self.size = len(head) + body_size
        self._left = limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._head.read(size)
        if len(data) < size:
            data += self._body.read(size - len(data))
        self._left -= len(data)
        return data
