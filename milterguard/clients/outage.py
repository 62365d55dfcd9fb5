"""The health of one dependency (clamd, a DNS server, Redis) as the log shows it.

An outage is logged twice: one line when the dependency goes away, with the
reason, and one when it is back, with how long it was away and how many
calls failed or were skipped in between.  While it is away, callers skip it
for a back-off interval (starting at `start`, doubling up to `cap`, a few
seconds at most), so that an outage costs no time per message and the
dependency is tried again within seconds of its return.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

BACKOFF_START = 0.5
BACKOFF_CAP = 4.0

# Every Outage of this process, for the health report of the web console (stores/history.py).
_WATCHED: "weakref.WeakSet[Outage]" = weakref.WeakSet()


def watched() -> list["Outage"]:
    """The dependencies this process watches, by name."""
    return sorted(list(_WATCHED), key=lambda o: o.name)


class Outage:
    """A dependency's state: up, or down since a time with a count of failures."""

    def __init__(self, name: str, log: logging.Logger, *, start: float = BACKOFF_START,
                 cap: float = BACKOFF_CAP, meanwhile: str = "") -> None:
        self.name = name
        self.log = log
        self.meanwhile = meanwhile  # what the filter does without it, said in the line that it went away
        self.start, self.cap = start, cap
        self.down_since = 0.0
        self.retry_at = 0.0
        self.failures = 0  # failed or skipped calls since it went away
        self._attempts = 0
        self._lock = threading.Lock()
        _WATCHED.add(self)

    @property
    def down(self) -> bool:
        return self.down_since > 0

    def usable(self) -> bool:
        """True when a call may be tried now; a call skipped here counts as failed.

        While the dependency is away, one caller is let through at each retry time:
        the others skip it until that attempt fails or succeeds (or for `cap`
        seconds, should it never say), so that concurrent callers do not all wait
        on a dependency that is still away.
        """
        if not self.down:
            return True
        now = time.monotonic()
        with self._lock:
            if not self.down:
                return True
            if now >= self.retry_at:
                self.retry_at = now + self.cap
                return True
            self.failures += 1
        return False

    def failed(self, reason: object) -> None:
        """A call failed: the first failure of an outage is logged."""
        now = time.monotonic()
        with self._lock:
            first = not self.down
            if first:
                self.down_since, self.failures, self._attempts = now, 0, 0
            self.failures += 1
            self._attempts += 1
            self.retry_at = now + min(self.cap, self.start * 2 ** (self._attempts - 1))
        if first:
            self.log.warning("%s unavailable: %s; %sretrying every %gs at most, one line when it is back",
                             self.name, reason, f"{self.meanwhile}; " if self.meanwhile else "", self.cap)

    def succeeded(self) -> None:
        """A call worked: the end of an outage is logged."""
        if not self.down:
            return
        with self._lock:
            if not self.down:
                return
            away, failures = time.monotonic() - self.down_since, self.failures
            self.down_since, self.failures, self._attempts, self.retry_at = 0.0, 0, 0, 0.0
        self.log.warning("%s back after %.1fs; %d calls failed or were skipped meanwhile", self.name, away, failures)
