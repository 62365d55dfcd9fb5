"""Reading stored messages the way an MTA hands them to a milter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator


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
