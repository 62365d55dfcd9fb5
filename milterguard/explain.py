"""Rendering a Verdict: the explain text, JSON, and the log line.

The milter's log line, the headers and the CLI all print from the same
Verdict, so they always agree.
"""

from __future__ import annotations

import json

from milterguard.model import Hits, Verdict


def _clip(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def explain_text(verdict: Verdict, name: str = "") -> str:
    """Every symbol with its weight, group, place and matched text; time per check; the result."""
    lines = []
    if name:
        lines.append(f"== {name}")
    width = max((len(h.symbol) for h in verdict.hits), default=10)
    for h in verdict.hits:
        note = ""
        if h.consumed_by:
            note = f" (consumed by {h.consumed_by})"
        elif h.state == "testing":
            note = " (testing: not counted)"
        elif abs(h.weight - h.base_weight) > 1e-9:
            note = f" (capped by group from {h.base_weight:+.2f})"
        if h.action is not None:
            note += f" [action {h.action.label}]"
        lines.append(f"{h.symbol:<{width}}  {h.weight:+6.2f}  {h.group:<9} {h.stage.label:<9} {h.source}{note}")
        lines.append(f"{'':<{width}}  {h.description}")
        detail = []
        if h.where:
            detail.append(f"in {h.where}")
        if h.text:
            # The whole text a check recorded (at most Hits.MAX_TEXT): the reasons of the
            # authentication checks (record, alignment, selector) come last and must show.
            detail.append(f"matched {_clip(h.text, Hits.MAX_TEXT + 3)!r}")
        if h.options:
            detail.append("options " + ", ".join(h.options))
        if detail:
            lines.append(f"{'':<{width}}  " + "; ".join(detail))
    th = verdict.thresholds
    reason = "" if verdict.reason == "score" else f", forced by {verdict.reason}"
    lines.append(
        f"total {verdict.score:.2f} -> {verdict.action.label}{reason} "
        f"(tag {th.tag:g}, review {th.review:g}, reject {th.reject:g})"
    )
    if verdict.mode != "enforce" or verdict.applied != verdict.action:
        lines.append(f"mode {verdict.mode}: the milter would apply {verdict.applied.label}")
    if verdict.stage.label != "final":
        lines.append(f"decided at {verdict.stage.label}" + (f" for recipient {verdict.rcpt} alone" if verdict.rcpt else ""))
    for refused in verdict.refused:
        hit = refused.hit(refused.reason)
        shown = f"{hit.symbol}({', '.join(hit.options)})" if hit is not None and hit.options else refused.reason
        lines.append(f"recipient {refused.rcpt} refused at {refused.stage.label}: {shown}")
    if verdict.timings:
        parts = [f"{k} {v * 1000:.2f}ms" for k, v in sorted(verdict.timings.items(), key=lambda kv: -kv[1]) if v > 0]
        lines.append("time: " + ", ".join(parts) + f"; total {verdict.elapsed * 1000:.2f}ms")
    return "\n".join(lines)


def verdict_dict(verdict: Verdict) -> dict:
    return {
        "score": verdict.score,
        "action": verdict.action.label,
        "applied": verdict.applied.label,
        "mode": verdict.mode,
        "reason": verdict.reason,
        "stage": verdict.stage.label,
        "thresholds": {"tag": verdict.thresholds.tag, "review": verdict.thresholds.review, "reject": verdict.thresholds.reject},
        "symbols": [
            {
                "name": h.symbol, "weight": round(h.weight, 3), "group": h.group, "options": h.options,
                "description": h.description, "where": h.where, "text": h.text, "stage": h.stage.label,
                "source": h.source, "state": h.state, "consumed_by": h.consumed_by or None,
            }
            for h in verdict.hits
        ],
        "timings_ms": {k: round(v * 1000, 3) for k, v in verdict.timings.items()},
        "elapsed_ms": round(verdict.elapsed * 1000, 3),
    }


def log_record(verdict: Verdict, max_bytes: int = 0, **fields) -> str:
    """The one structured log line per message: `verdict {json}`.

    With *max_bytes*, the line is kept under that size (syslog cuts longer
    lines): the recipients, then the symbols, are shortened from the end, and
    `rcpts_more` / `symbols_more` count what was left out.
    """
    record = dict(fields)
    record.update(
        score=verdict.score, action=verdict.action.label, applied=verdict.applied.label, reason=verdict.reason,
        stage=verdict.stage.label, symbols=[h.symbol for h in verdict.hits],
        elapsed_ms=round(verdict.elapsed * 1000, 2),
    )
    line = _verdict_line(record)
    for key in ("rcpts", "symbols"):
        if not max_bytes or len(line.encode("utf-8")) <= max_bytes:
            break
        line = _shorten(record, key, max_bytes)
    return line


def _verdict_line(record: dict) -> str:
    return "verdict " + json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _shorten(record: dict, key: str, max_bytes: int) -> str:
    """The line with the longest head of record[key] that fits, and `<key>_more`."""
    items = list(record.get(key) or ())
    low, high = 0, len(items)
    while low < high:  # the most items that fit, by bisection
        middle = (low + high + 1) // 2
        record[key], record[f"{key}_more"] = items[:middle], len(items) - middle
        if len(_verdict_line(record).encode("utf-8")) <= max_bytes:
            low = middle
        else:
            high = middle - 1
    record[key], record[f"{key}_more"] = items[:low], len(items) - low
    return _verdict_line(record)
