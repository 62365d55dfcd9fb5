"""Messages to learn from: files, directories, Maildirs and mbox files."""

from __future__ import annotations

import mailbox
import os
import re
from typing import Iterator

from milterguard.mail.raw import iter_message_files, read_message

# An mbox separator: "From " at the start of a line after an empty line,
# followed by an address and an asctime date ("From a@b Mon Jan  1 ...").
_MBOX_SEPARATOR = re.compile(rb"\n\nFrom \S+ +(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ")


def is_mbox(path: str) -> bool:
    """True for a file of several messages separated by mbox "From " lines."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return head.startswith(b"From ") and _MBOX_SEPARATOR.search(head) is not None


def iter_messages(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """(name, raw message) for every message under PATHS.

    A directory is walked (a Maildir's cur/ and new/ with it; its tmp/ is
    skipped, as messages there are still being written); an mbox file
    yields each of its messages as `FILE:N`; any other file is one message.
    """
    for path in iter_message_files(paths):
        parent = os.path.dirname(path)
        if os.path.basename(parent) == "tmp" and os.path.isdir(os.path.join(os.path.dirname(parent), "cur")):
            continue  # a Maildir's tmp/
        if path != "-" and is_mbox(path):
            box = mailbox.mbox(path, create=False)
            try:
                for index, key in enumerate(box.iterkeys()):
                    yield f"{path}:{index + 1}", box.get_bytes(key)
            finally:
                box.close()
            continue
        yield path, read_message(path)


def count_messages(paths: list[str]) -> int:
    """How many messages iter_messages will yield (for a progress bar); mbox files counted by separators."""
    total = 0
    for path in iter_message_files(paths):
        if path != "-" and is_mbox(path):
            with open(path, "rb") as f:
                total += 1 + len(_MBOX_SEPARATOR.findall(f.read()))
        else:
            total += 1
    return total
