"""The overview's charts, drawn on the server as SVG: no script, colours from the style sheet."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

ORDER = ("reject", "tempfail", "discard", "review", "tag", "accept")
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 220, 44, 24, 8


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    action: str
    count: int
    label: str


@dataclass
class Chart:
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # (x, text)
    grid: list[tuple[float, int]]  # (y, value)
    width: int = WIDTH
    height: int = HEIGHT
    total: int = 0


def stacked(series: dict, step: int) -> Chart:
    """A stacked bar per bucket of SERIES (History.action_series), one colour per action."""
    starts: Sequence[int] = series["starts"]
    actions = series["actions"]
    n = max(1, len(starts))
    totals = [sum(actions.get(a, [0] * n)[i] for a in actions) for i in range(len(starts))]
    top = max(totals or [0]) or 1
    scale = _nice(top)
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    slot = plot_w / n
    bars: list[Bar] = []
    names = [a for a in ORDER if a in actions] + sorted(a for a in actions if a not in ORDER)
    for i, start in enumerate(starts):
        y = TOP + plot_h
        for name in names:
            count = actions[name][i]
            if not count:
                continue
            h = plot_h * count / scale
            y -= h
            bars.append(Bar(LEFT + i * slot + 1, round(y, 2), max(1.0, slot - 2), round(h, 2), name, count,
                            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(start))}: {count} {name}"))
    every = max(1, n // 8)
    fmt = "%H:%M" if step < 86400 and len(starts) * step <= 86400 * 1.5 else "%a %H:%M"
    ticks = [(LEFT + i * slot + slot / 2, time.strftime(fmt, time.localtime(s))) for i, s in enumerate(starts)
             if i % every == 0]
    grid = [(TOP + plot_h - plot_h * v / scale, v) for v in (0, scale // 2, scale)]
    return Chart(bars, ticks, grid, total=sum(totals))


def _nice(top: int) -> int:
    """The smallest of 1, 2, 5 times a power of ten at least TOP."""
    power = 1
    while True:
        for m in (1, 2, 5):
            if m * power >= top:
                return m * power
        power *= 10
