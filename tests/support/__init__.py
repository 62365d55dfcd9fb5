"""Test infrastructure: real servers on loopback (STYLE.md section 10).

Everything in this package is importable without pytest so that the
benchmark harness can reuse it::

    sys.path.insert(0, "tests")
    from support.postfix import PostfixInstance
    from support.sink import SmtpSink

Modules:

- ``postfix``: :class:`PostfixInstance`, a private Postfix in a work dir.
- ``sink``: :class:`SmtpSink`, the next hop that stores what it receives.
- ``noop_milter``: a runnable no-op pymilter milter + its process wrapper.
- ``milterguard_proc``: :class:`MilterguardProcess` (``milterguard serve``).

Shared helpers here:

- :func:`free_port` picks a loopback TCP port by binding port 0.
- :func:`wait_until` polls a predicate with short sleeps until a deadline.
- :func:`port_accepts` / :func:`socket_accepts` tell whether something
  listens on a TCP port / milter socket spec.
- :class:`MilterProcess`: a milter child process (log file, readiness,
  SIGTERM with a deadline, worker PIDs).
- :func:`run_miltertest` runs a ``tests/miltertest/*.lua`` script.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

__all__ = [
    "LOOPBACK",
    "MilterProcess",
    "REPO_ROOT",
    "SupportError",
    "child_pids",
    "free_port",
    "parse_socket_spec",
    "pid_alive",
    "port_accepts",
    "read_smtp_greeting",
    "run_miltertest",
    "session_members",
    "socket_accepts",
    "stop_process",
    "wait_until",
]

LOOPBACK = "127.0.0.1"


def corpus_dir() -> Path:
    """The shared mail corpus: $MILTERGUARD_CORPUS, else shared/corpus beside the checkout."""
    configured = os.environ.get("MILTERGUARD_CORPUS")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "shared" / "corpus"
REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


class SupportError(RuntimeError):
    """A test service failed to start, stop or answer in time."""


def read_log(path: Path) -> str:
    """The text of a log file, "" before the process has written it."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def log_tail(path: Path, n: int) -> str:
    """The last N lines of a log file."""
    return "\n".join(read_log(path).splitlines()[-n:])


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on *host* a moment ago.

    The port is found by binding port 0 and closing the socket again, so
    another process may grab it before the caller binds it; callers that
    start a server retry on "address in use" where that is cheap.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll *predicate* until it returns a truthy value or *timeout* expires.

    Returns the truthy value.  Raises :class:`SupportError` at the deadline;
    *on_timeout* may supply extra diagnostics (a log tail) for the message.
    The sleep between polls is short and bounded by the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            extra = on_timeout() if on_timeout else ""
            raise SupportError(
                f"timed out after {timeout:.1f}s waiting for {what}"
                + (f"\n{extra}" if extra else "")
            )
        time.sleep(min(interval, remaining))


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_smtp_greeting(port: int, host: str = LOOPBACK, timeout: float = 2.0) -> str | None:
    """Connect, read the first SMTP reply line and say QUIT; None on failure."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            f = s.makefile("rb")
            line = f.readline(1024).decode("latin-1")
            # Read the rest of a multi-line greeting.
            while len(line) >= 4 and line[3] == "-":
                line = f.readline(1024).decode("latin-1")
            try:
                s.sendall(b"QUIT\r\n")
                f.readline(1024)
            except OSError:
                pass
            return line.rstrip("\r\n") or None
    except OSError:
        return None


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """Send *sig* to *proc*, wait up to *timeout*, then SIGKILL. Returns rc."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        return proc.wait(5)


def pid_alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # State is the field after the parenthesised comm (which may hold spaces).
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def socket_accepts(spec: str, timeout: float = 0.5) -> bool:
    """True if the milter socket *spec* accepts a connection.

    *spec* is libmilter notation: ``inet:PORT@HOST``, ``inet:PORT``
    or ``unix:PATH`` / ``local:PATH``.
    """
    kind, addr = parse_socket_spec(spec)
    if kind == "unix":
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(addr)
                return True
        except OSError:
            return False
    host, port = addr
    return port_accepts(port, host, timeout)


def parse_socket_spec(spec: str) -> tuple[str, object]:
    """``inet:PORT@HOST`` -> ("inet", (HOST, PORT)); ``unix:PATH`` -> ("unix", PATH)."""
    m = re.fullmatch(r"inet:(\d+)(?:@(.+))?", spec)
    if m:
        return "inet", (m.group(2) or LOOPBACK, int(m.group(1)))
    m = re.fullmatch(r"(?:unix|local):(.+)", spec)
    if m:
        return "unix", m.group(1)
    raise ValueError(f"unsupported milter socket {spec!r} (want inet:PORT@HOST or unix:PATH)")


def child_pids(pid: int) -> list[int]:
    """Direct children of *pid*, found by scanning /proc/*/stat (no psutil).

    /proc/PID/task/*/children needs CONFIG_PROC_CHILDREN, which is not
    always there, so the ppid field is used instead.
    """
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry.name))
    return sorted(kids)


def session_members(sid: int) -> list[int]:
    """Live PIDs whose session id is *sid* (the children of a
    ``start_new_session=True`` process keep its session)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields: state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return sorted(members)


class MilterProcess:
    """A milter running as a child process, listening on a socket.

    Output (stdout and stderr) goes to *log_file*.  :meth:`start` waits
    until the socket accepts connections, and fails at once, with the log,
    if the process exits first.  Subclasses build ``argv``.
    """

    ready_timeout = 30.0
    #: after SIGTERM, connect to the socket now and then to wake libmilter
    wake_listener = True

    def __init__(self, workdir: Path | str, *, socket: str | None = None,
                 log_name: str = "milter.log", env: dict[str, str] | None = None,
                 cwd: Path | str | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._fixed_socket = socket is not None
        self.socket = socket or f"inet:{free_port()}@{LOOPBACK}"
        self.log_file = self.workdir / log_name
        self.env = env
        self.cwd = Path(cwd) if cwd else REPO_ROOT
        self.proc: subprocess.Popen | None = None
        self._known_children: set[int] = set()

    # -- to override --------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    # -- properties ---------------------------------------------------
    @property
    def port(self) -> int | None:
        kind, addr = parse_socket_spec(self.socket)
        return addr[1] if kind == "inet" else None

    @property
    def postfix_socket(self) -> str:
        """The socket in Postfix notation (``inet:HOST:PORT`` / ``unix:PATH``)."""
        kind, addr = parse_socket_spec(self.socket)
        return f"inet:{addr[0]}:{addr[1]}" if kind == "inet" else f"unix:{addr}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_pids(self) -> list[int]:
        """PIDs of the direct children of the main process."""
        if not self.is_running():
            return []
        kids = child_pids(self.proc.pid)
        self._known_children.update(kids)
        return kids

    def log_text(self) -> str:
        return read_log(self.log_file)

    def log_tail(self, n: int = 60) -> str:
        return log_tail(self.log_file, n)

    # -- lifecycle ----------------------------------------------------
    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if self.env:
            env.update(self.env)
        return env

    def start(self, timeout: float | None = None) -> "MilterProcess":
        """Start and wait until the socket accepts; retry on a port clash."""
        if self.is_running():
            return self
        timeout = self.ready_timeout if timeout is None else timeout
        attempts = 1 if self._fixed_socket else 3
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                # Later start()s (after stop()) reuse this socket, so that an
                # MTA pointed at it finds the milter again.
                self._fixed_socket = True
                return self
            except SupportError as e:
                clash = "address already in use" in str(e).lower()
                if not clash or attempt == attempts - 1:
                    raise
                self.socket = f"inet:{free_port()}@{LOOPBACK}"
        return self

    def _start_once(self, timeout: float) -> None:
        kind, addr = parse_socket_spec(self.socket)
        if kind == "unix" and os.path.exists(addr):
            os.unlink(addr)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self._environ(), start_new_session=True)

        def ready() -> bool:
            if self.proc.poll() is not None:
                text = self.log_text()[offset:]
                raise SupportError(
                    f"{self.argv()[:4]} exited with {self.proc.returncode} before "
                    f"listening on {self.socket}\n--- log ---\n{text[-4000:]}")
            return socket_accepts(self.socket)

        try:
            wait_until(ready, timeout, interval=0.05, what=f"milter on {self.socket}",
                       on_timeout=lambda: "--- log ---\n" + self.log_text()[offset:][-4000:])
        except SupportError:
            self.stop(timeout=5)
            raise

    def signal(self, sig: int) -> None:
        if not self.is_running():
            raise SupportError("process is not running")
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to *timeout* (drain), then SIGKILL; also reap workers."""
        if self.proc is None:
            return None
        kids = set(self.worker_pids()) | self._known_children
        rc = self.proc.poll()
        if rc is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            # libmilter's listener only notices the stop flag when poll()
            # returns, which after the first session can take its full
            # 5 s timeout.  An empty connection wakes it up at once.
            deadline = time.monotonic() + timeout
            next_poke = time.monotonic() + 0.05
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self.wake_listener and time.monotonic() >= next_poke:
                    socket_accepts(self.socket, timeout=0.2)
                    next_poke = time.monotonic() + 0.5
                time.sleep(0.02)
            rc = stop_process(self.proc, 5.0, signal.SIGKILL) if self.proc.poll() is None \
                else self.proc.returncode
        # Children that outlive their parent would hold the port.
        for pid in kids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Anything left in the session we started (grandchildren).
        for pid in session_members(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._known_children.clear()
        return rc

    def restart(self, timeout: float | None = None) -> "MilterProcess":
        """Stop and start again on the same socket."""
        self.stop()
        return self.start(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


MILTERTEST = shutil.which("miltertest") or "/usr/bin/miltertest"
MILTERTEST_DIR = Path(__file__).resolve().parents[1] / "miltertest"


def run_miltertest(script: str | Path, socket: str, *, timeout: float = 60.0,
                   verbose: int = 0, **variables: object) -> subprocess.CompletedProcess:
    """Run ``miltertest -s SCRIPT -D socket=SOCKET -D testdir=DIR -D k=v ...``.

    *script* is a path, or a bare name looked up in ``tests/miltertest/``
    (``"noop.lua"`` or ``"noop"``).  *socket* is libmilter notation
    (``inet:PORT@127.0.0.1``).  Each keyword becomes a Lua global string
    (``-D name=value``); ``testdir`` is ``tests/miltertest`` so a script
    can ``dofile(testdir .. "/lib.lua")``.  Returns the CompletedProcess (text output);
    the caller asserts on ``returncode`` (0 = the script ran to the end)
    and on what the script printed with ``mt.echo``.
    """
    path = Path(script)
    if not path.exists():
        name = path.name if path.suffix == ".lua" else path.name + ".lua"
        path = MILTERTEST_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"miltertest script {script!r} not found")
    argv = [MILTERTEST, *(["-v"] * verbose), "-s", str(path), "-D", f"socket={socket}",
            "-D", f"testdir={MILTERTEST_DIR}"]
    for k, v in variables.items():
        argv += ["-D", f"{k}={v}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
