"""Load generation and delivery counting with Postfix's own test tools.

- :class:`SinkCounter` runs ``smtp-sink -c`` on a free loopback port and
  timestamps every change of its message counter (``mesg=N``), so that a
  round ends at the moment the last message was delivered.
- :func:`run_smtp_source` runs ``smtp-source`` with a bounded message count
  and a deadline.
- :func:`latency_probe` sends messages one at a time through
  :meth:`PostfixInstance.send` (smtplib) and records each transaction.

Every loop here is bounded by a count and by a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from support import LOOPBACK, SupportError, free_port, port_accepts, wait_until  # type: ignore[import-not-found]

SMTP_SINK = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source", path="/usr/sbin:/usr/bin") or "/usr/sbin/smtp-source"

_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


class SinkCounter:
    """``smtp-sink`` on 127.0.0.1:<free port>, throwing messages away.

    ``smtp-sink -c`` prints ``sess=N quit=N mesg=N`` followed by a carriage
    return whenever a session ends, QUIT is seen or a message's final dot
    arrives; a reader thread keeps the latest ``mesg`` value and the time
    it changed.  smtp-sink is a single-process event loop in C and is never
    the bottleneck at the rates measured here.
    """

    def __init__(self, workdir: Path, *, user: str = "postfix", max_sessions: int = 256) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.max_sessions = max_sessions
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._cond = threading.Condition()
        self.messages = 0
        self.sessions = 0
        self.last_change = 0.0  # time.monotonic() of the last counter change
        self._thread: threading.Thread | None = None
        self.err_file = self.workdir / "smtp-sink.err"

    def start(self, timeout: float = 10.0) -> "SinkCounter":
        for attempt in range(3):
            self.port = free_port()
            # -u: smtp-sink refuses to run as root; -4: IPv4 only;
            # -m: connections handled at once; the last argument is the backlog.
            cmd = [SMTP_SINK, "-u", self.user, "-4", "-c", "-m", str(self.max_sessions),
                   "-h", "sink.bench.invalid", f"{LOOPBACK}:{self.port}", "256"]
            with open(self.err_file, "ab") as err:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=err, start_new_session=True)
            self._thread = threading.Thread(target=self._read, name="smtp-sink-counter", daemon=True)
            self._thread.start()
            try:
                wait_until(lambda: self.proc.poll() is not None or port_accepts(self.port), timeout,
                           what=f"smtp-sink on port {self.port}")
            except SupportError:
                self.stop()
                raise
            if self.proc.poll() is None:
                # The probe connection itself counts as one session; harmless.
                return self
            if attempt == 2:
                raise SupportError(f"smtp-sink exited: {self.err_file.read_text(errors='replace')[-2000:]}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            # Keep only the tail after the last complete record.
            *records, buf = buf.split(b"\r")
            for rec in reversed(records):
                m = _COUNTERS.search(rec)
                if m:
                    with self._cond:
                        mesg = int(m.group(3))
                        if mesg != self.messages:
                            self.messages = mesg
                            self.last_change = now
                        self.sessions = int(m.group(1))
                        self._cond.notify_all()
                    break

    def wait_for(self, count: int, timeout: float) -> tuple[bool, int, float]:
        """Wait until the message counter reaches *count* or *timeout* expires.

        Returns (reached, counter, monotonic time of the last change).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.messages < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    break
                self._cond.wait(min(remaining, 0.5))
            return self.messages >= count, self.messages, self.last_change

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._thread is not None:
            self._thread.join(2)


@dataclass
class SourceResult:
    returncode: int | None
    started: float  # time.monotonic() just before smtp-source was spawned
    finished: float  # when smtp-source exited (or was killed)
    timed_out: bool
    stderr: str = ""


def run_smtp_source(port: int, message_file: Path, *, messages: int, sessions: int,
                    sender: str, rcpt: str, helo: str = "client.bench.invalid",
                    timeout: float = 120.0) -> SourceResult:
    """Send *messages* copies of *message_file* with *sessions* parallel SMTP sessions.

    One message per connection (no ``-d``), as an MX sees it.  ``-A`` keeps
    going after a non-2xx reply, so that a refused message shows up as a
    missing delivery rather than killing the run.  ``-F`` sends the file
    as is (dot-stuffed, CRLF line ends); smtp-source adds no headers then.
    """
    cmd = [SMTP_SOURCE, "-4", "-A", "-C", "3", "-m", str(messages), "-s", str(sessions),
           "-F", str(message_file), "-f", sender, "-t", rcpt, "-M", helo,
           f"{LOOPBACK}:{port}"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    timed_out = False
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return SourceResult(proc.returncode, started, time.monotonic(), timed_out,
                        (err or b"").decode("utf-8", "replace")[-2000:])


@dataclass
class LatencyResult:
    sent: int
    ok: int
    codes: dict[str, int] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)


def latency_probe(postfix, data: bytes, *, count: int, sender: str, rcpt: str,
                  deadline_s: float) -> LatencyResult:
    """Send *count* messages one at a time; time each whole SMTP transaction.

    The time runs from connect to the 250 reply after the final dot (QUIT
    excluded), i.e. how long a sending MTA waits for one message at
    concurrency 1.  It talks smtplib directly rather than through
    :meth:`PostfixInstance.send` so that QUIT stays outside the timed part,
    and stops at *deadline_s* even when fewer messages were sent.
    """
    import smtplib

    res = LatencyResult(sent=0, ok=0)
    stop_at = time.monotonic() + deadline_s
    for _ in range(count):
        if time.monotonic() > stop_at:
            break
        smtp = smtplib.SMTP(timeout=30, local_hostname="probe.bench.invalid")
        t0 = time.perf_counter()
        code = 0
        try:
            smtp.connect(postfix.host, postfix.smtpd_port)
            smtp.ehlo()
            smtp.mail(sender)
            smtp.rcpt(rcpt)
            code, _ = smtp.data(data)
        except smtplib.SMTPResponseException as e:
            code = e.smtp_code
        except (smtplib.SMTPException, OSError):
            code = -1
        elapsed = (time.perf_counter() - t0) * 1000.0
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        smtp.close()
        res.sent += 1
        res.codes[str(code)] = res.codes.get(str(code), 0) + 1
        if 200 <= code < 300:
            res.ok += 1
            res.times_ms.append(elapsed)
    return res
