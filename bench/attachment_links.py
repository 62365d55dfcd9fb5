#!/usr/bin/env python3
"""What reading links from PDFs and QR codes costs the engine, message by message.

    python bench/attachment_links.py [--rounds 3] [--toggle SETTING] [DIR ...]

Two engines of the same code, one with `attachments.links` (or the boolean
setting given by --toggle, e.g. `attachments.pdf_render`) on and one with it
off, both with `dns.enabled=false`, judge every message in turn,
interleaved so that the machine's load falls on both alike; each message's time
is the least of --rounds passes. Printed: the median and p99 per message of
each, the median of the differences, and the same for the messages that carry
a PDF or an image (where the work is), for those with a PDF, and for the others
(where it must cost nothing). Not a test; every loop is bounded by the messages given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchenv import BenchEnv
from milterguard.cli.scan import build
from milterguard.config import load_config
from milterguard.engine.core import Engine
from milterguard.mail import pdfrender
from milterguard.mail.message import Message

CORPUS = Path(os.environ.get("MILTERGUARD_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
DEFAULT_DIRS = [CORPUS / "modern" / "spam", CORPUS / "modern" / "ham", CORPUS / "spamassassin" / "ham",
                CORPUS / "spamassassin" / "spam", CORPUS / "spamassassin" / "hard_ham"]


def carries_pdf(raw: bytes) -> bool:
    return any(p.payload[:5] == b"%PDF-" for p in Message.from_bytes(raw).parts)


def carries_media(raw: bytes) -> bool:
    """Whether the message has a part whose bytes are a PDF or an image (the only ones that cost)."""
    msg = Message.from_bytes(raw)
    return any(p.payload[:5] == b"%PDF-" or p.payload[:4] in (b"\x89PNG", b"GIF8") or p.payload[:3] == b"\xff\xd8\xff"
               or "data:image/" in (p.text or "") for p in msg.parts)


def pct(values: list[float], fraction: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--toggle", default="attachments.links", help="the boolean setting compared on and off")
    parser.add_argument("dirs", nargs="*", type=Path, default=DEFAULT_DIRS)
    args = parser.parse_args()
    raws = [p.read_bytes() for d in args.dirs for p in sorted(d.iterdir()) if p.suffix != ".md" and p.is_file()]
    engines = {name: Engine.load(load_config(sets=["dns.enabled=false", f"{args.toggle}={name}"]))
               for name in ("true", "false")}
    best = {name: [float("inf")] * len(raws) for name in engines}
    for _ in range(max(1, args.rounds)):
        for i, raw in enumerate(raws):
            for name, engine in engines.items():
                conn, txn = build(BenchEnv, raw, i)
                t0 = time.perf_counter()
                engine.evaluate(conn, txn)
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
    media = [carries_media(raw) for raw in raws]
    pdfs = [carries_pdf(raw) for raw in raws]
    print(f"{args.toggle} on against off")
    for label, keep in (("all", lambda i: True), ("with a PDF or image", lambda i: media[i]),
                        ("with a PDF", lambda i: pdfs[i]), ("without", lambda i: not media[i])):
        idx = [i for i in range(len(raws)) if keep(i)]
        if not idx:
            continue
        on = [best["true"][i] * 1000 for i in idx]
        off = [best["false"][i] * 1000 for i in idx]
        diff = [a - b for a, b in zip(on, off)]
        print(f"{label}: {len(idx)} messages; on: median {statistics.median(on):.3f} ms, p99 {pct(on, .99):.2f} ms, "
              f"mean {statistics.fmean(on):.3f} ms; off: median {statistics.median(off):.3f} ms, p99 {pct(off, .99):.2f} ms, "
              f"mean {statistics.fmean(off):.3f} ms; median difference {statistics.median(diff):+.3f} ms")
    print(f"PDF pages rendered in all the passes: {pdfrender.stats['rendered']} ({pdfrender.stats['failed']} failed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
