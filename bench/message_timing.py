"""Time Message parsing + text + URL extraction over the shared corpus.

Not a test: run it by hand after touching milterguard/mail/message.py,
htmltext.py or urls.py, and compare with the figures in the change.

    python bench/message_timing.py [corpus-dir ...]
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

from milterguard.mail.message import Message

DEFAULT_DIRS = [
    "/work/shared/corpus/spamassassin/ham",
    "/work/shared/corpus/spamassassin/hard_ham",
    "/work/shared/corpus/spamassassin/spam",
]


def one(raw: bytes) -> None:
    """What EOM does for every message: parse, render text, extract URLs."""
    message = Message.from_bytes(raw)
    message.text
    message.urls


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    index = min(len(sorted_values) - 1, int(len(sorted_values) * fraction))
    return sorted_values[index]


def main(argv: list[str]) -> int:
    """Print median, p90, p99 and max time per message, in microseconds."""
    dirs = argv or DEFAULT_DIRS
    raws = [path.read_bytes() for folder in dirs for path in sorted(pathlib.Path(folder).glob("*.eml"))]
    if not raws:
        print("no messages found", file=sys.stderr)
        return 1
    for raw in raws:  # warm-up: imports, regex compilation, charset cache
        one(raw)
    rounds = 3
    best = [float("inf")] * len(raws)
    for _ in range(rounds):
        for index, raw in enumerate(raws):
            start = time.perf_counter()
            one(raw)
            best[index] = min(best[index], time.perf_counter() - start)
    timings = sorted(value * 1e6 for value in best)
    sizes = sorted(len(raw) for raw in raws)
    print(f"{len(raws)} messages, median size {sizes[len(sizes) // 2]} bytes, best of {rounds} rounds")
    print(
        f"per message: median {statistics.median(timings):.0f} us, "
        f"p90 {percentile(timings, 0.90):.0f} us, p99 {percentile(timings, 0.99):.0f} us, "
        f"max {timings[-1]:.0f} us, mean {statistics.fmean(timings):.0f} us"
    )
    total = sum(timings) / 1e6
    print(f"throughput on one core: {len(raws) / total:.0f} messages/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
