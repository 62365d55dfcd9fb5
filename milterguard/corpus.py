"""Corpus runs: the fixed train/test split and per-symbol hit statistics.

The split is a property of the file name alone, so that anyone can repeat
a figure: a message belongs to the test split when the first eight hex
digits of the MD5 of its file name, read as a number, are divisible by 5
(about one message in five); every other message is in the train split.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable


def split_of(path: str) -> str:
    """'test' or 'train' for a message file, by the fixed rule above."""
    digest = hashlib.md5(os.path.basename(path).encode("utf-8")).hexdigest()
    return "test" if int(digest[:8], 16) % 5 == 0 else "train"


def select(paths: Iterable[str], split: str) -> list[str]:
    """The paths of one split ('train', 'test' or 'all')."""
    paths = list(paths)
    if split == "all":
        return paths
    return [p for p in paths if split_of(p) == split]


@dataclass
class Result:
    path: str
    label: str  # "spam" or "ham"
    score: float
    action: str
    symbols: frozenset[str]
    elapsed: float


@dataclass
class SymbolStats:
    symbol: str
    spam: int = 0
    ham: int = 0
    overlaps: dict[str, int] = field(default_factory=dict)


class Progress:
    """A one-line progress bar on stderr, drawn only where someone can see it."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        width = 30
        filled = int(width * self.done / self.total)
        rate = self.done / max(now - self.started, 1e-6)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.0f}/s"
        )
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def symbol_stats(results: list[Result], symbols: Iterable[str] | None = None) -> list[SymbolStats]:
    """Hits per symbol on spam and ham, and which other symbols hit the same messages."""
    wanted = set(symbols) if symbols is not None else None
    stats: dict[str, SymbolStats] = {}
    for r in results:
        for sym in r.symbols:
            if wanted is not None and sym not in wanted:
                continue
            st = stats.setdefault(sym, SymbolStats(sym))
            if r.label == "spam":
                st.spam += 1
            else:
                st.ham += 1
            for other in r.symbols:
                if other != sym:
                    st.overlaps[other] = st.overlaps.get(other, 0) + 1
    return sorted(stats.values(), key=lambda s: (-(s.spam + s.ham), s.symbol))
