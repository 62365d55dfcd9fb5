"""Synthetic spam and ham for learning tests: two vocabularies, seeded, repeatable.

    spam = make_message("spam", 3)      # bytes of an RFC 5322 message
    write_corpus(tmp_path, spam=40, ham=40)   # tmp_path/spam/*.eml, tmp_path/ham/*.eml
"""

from __future__ import annotations

import random
from pathlib import Path

SPAM_WORDS = ("viagra pills cheap offer winner lottery claim prize money bitcoin wire urgent unsubscribe "
              "casino bonus discount pharmacy refinance mortgage loan credit guaranteed").split()
HAM_WORDS = ("meeting agenda patch review release notes kernel build python module thanks regards "
             "tomorrow minutes draft schedule branch commit test mailing list project").split()
COMMON = "the a to and of for you your this that with is are we on in".split()


def make_message(label: str, index: int, extra: str = "") -> bytes:
    """One message of class LABEL ('spam' or 'ham'); different INDEX, different text."""
    rng = random.Random(f"{label}-{index}")
    words = SPAM_WORDS if label == "spam" else HAM_WORDS
    body = " ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(COMMON) for _ in range(60))
    subject = " ".join(rng.choice(words) for _ in range(4))
    sender = "deals@promo-offers.example" if label == "spam" else "dev@lists.example.org"
    url = "http://cheap-pills.example/buy" if label == "spam" else "https://git.example.org/project"
    return (
        f"From: {sender}\nTo: user@example.net\nSubject: {subject}\n"
        f"Message-ID: <{label}-{index}@example>\nDate: Mon, 1 Jan 2024 10:00:00 +0000\n\n"
        f"{body}\n{url}\n{extra}\n"
    ).encode()


def write_corpus(root: Path, spam: int, ham: int) -> tuple[Path, Path]:
    """Directories root/spam and root/ham with that many messages each."""
    dirs = []
    for label, count in (("spam", spam), ("ham", ham)):
        d = Path(root) / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (d / f"{label}{i:04d}.eml").write_bytes(make_message(label, i))
        dirs.append(d)
    return dirs[0], dirs[1]


def strip_message_id(raw: bytes) -> bytes:
    """RAW without its Message-ID header (and its folded lines), with CRLF line ends: for
    sending a stored message again under a Message-ID of one's own."""
    raw = raw.replace(b"\r\n", b"\n")
    head, sep, body = raw.partition(b"\n\n")
    kept, skipping = [], False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"message-id:")
        if not skipping:
            kept.append(line)
    return (b"\n".join(kept) + sep + body).replace(b"\n", b"\r\n")
