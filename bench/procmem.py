"""Memory and CPU of a group of processes, sampled in a background thread.

RSS counts a page shared by a supervisor and its forked workers once per
process, so the sum of RSS overstates a pre-forking daemon; PSS divides
each shared page among the processes that map it, so the sum of PSS is
the group's real footprint.  Both come from /proc/PID/smaps_rollup.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _rollup(pid: int) -> tuple[int, int] | None:
    """(Rss, Pss) in KiB, or None if the process is gone."""
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
                    break
    except OSError:
        return None
    if rss is None or pss is None:
        return None
    return rss, pss


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* (and of its reaped children) in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # After the comm: state(0) ppid ... utime(11) stime(12) cutime(13) cstime(14)
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


@dataclass
class MemSample:
    rss_kib: int
    pss_kib: int
    nprocs: int


def sample(pids: list[int]) -> MemSample:
    rss = pss = n = 0
    for pid in pids:
        r = _rollup(pid)
        if r is None:
            continue
        rss += r[0]
        pss += r[1]
        n += 1
    return MemSample(rss, pss, n)


class MemSampler:
    """Sample the processes that *pids()* returns every *interval* seconds.

    Keeps the maximum sum of RSS and of PSS seen (each maximised on its
    own) and the largest number of processes.  The thread stops at
    :meth:`stop` or after *max_seconds*, whichever comes first.
    """

    def __init__(self, pids: Callable[[], list[int]], *, interval: float = 0.25,
                 max_seconds: float = 900.0) -> None:
        self.pids = pids
        self.interval = interval
        self.max_seconds = max_seconds
        self.max_rss_kib = 0
        self.max_pss_kib = 0
        self.max_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def _take(self) -> None:
        s = sample(self.pids())
        if s.nprocs:
            self.max_rss_kib = max(self.max_rss_kib, s.rss_kib)
            self.max_pss_kib = max(self.max_pss_kib, s.pss_kib)
            self.max_procs = max(self.max_procs, s.nprocs)
            self.samples += 1

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self._take()
            self._stop.wait(self.interval)

    def start(self) -> "MemSampler":
        self._take()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._take()
