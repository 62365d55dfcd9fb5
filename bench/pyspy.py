"""Where milterguard's workers spend their CPU: py-spy on each worker under load.

``py-spy record --format raw`` writes collapsed stacks (``f1;f2;...;fN count``,
outermost frame first).  :func:`summarise` turns them into the functions
with the most samples on top of the stack (self) and anywhere in it
(inclusive).  py-spy is an optional tool (``pip install py-spy``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    return shutil.which("py-spy")


def start_record(pid: int, out: Path, seconds: int, rate: int = 100) -> subprocess.Popen:
    """Start ``py-spy record`` on *pid* for *seconds*; returns the process.

    ``--gil`` samples only the thread that holds the GIL, i.e. where the
    worker's Python CPU goes.  Without it, py-spy counts libmilter's session
    threads as active while they wait in C (for the socket or to take the
    GIL back after ``smfi_addheader``), which buries the real profile under
    waits.  ``--nonblocking`` reads the target's memory without pausing it;
    ``--function`` groups samples by function rather than by line; the
    stacks of all threads add up.
    """
    cmd = [py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
           "--rate", str(rate), "--format", "raw", "--function", "--nonblocking", "--gil",
           "--output", str(out)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:12)" -> "function (file.py:12)" stays readable.
    name, _, where = frame.partition(" (")
    if where:
        where = where.rstrip(")")
        path, _, line = where.rpartition(":")
        short = "/".join(Path(path).parts[-2:]) if path else where
        return f"{name} ({short}:{line})" if line else f"{name} ({short})"
    return frame


def summarise(files: list[Path], top: int = 20, *, seconds: float = 0, rate: int = 100) -> dict:
    """Top functions by self and inclusive samples over all *files*.

    With *seconds*, also the share of the time each process held the GIL
    (its samples against ``seconds * rate``).
    """
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    per_file: dict[str, int] = {}
    for f in files:
        before = total
        try:
            text = f.read_text(errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_frame_name(fr) for fr in stack.split(";") if fr]
            if not frames:
                continue
            total += n
            self_c[frames[-1]] += n
            for fr in set(frames):
                incl_c[fr] += n
        per_file[f.name] = total - before

    def rows(counter: Counter[str]) -> list[dict]:
        return [{"function": k, "samples": v, "percent": round(100.0 * v / total, 1) if total else 0.0}
                for k, v in counter.most_common(top)]

    out = {"samples": total, "self": rows(self_c), "inclusive": rows(incl_c)}
    if seconds:
        out["gil_held_percent"] = {name: round(100.0 * n / (seconds * rate), 1) for name, n in per_file.items()}
    return out
