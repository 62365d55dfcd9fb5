"""The daemon: a supervisor and pre-forked workers sharing one listening socket.

Python runs one thread at a time, so one process uses one core.  The
supervisor opens the milter socket once, loads the configuration and the
rules, and forks the workers, which inherit both; each worker runs
libmilter's accept loop on the shared socket and the kernel spreads the
connections among them.

Signals reach the supervisor, whose handlers only queue them:

- SIGHUP: load the configuration and rules anew; when they are broken, log
  why and keep serving with the old ones; when they load, tell each worker
  (through its pipe) to switch.  A worker swaps its engine for new
  connections only; a connection keeps the engine it started with.
- SIGTERM / SIGINT: close the listening socket in every process, so that a
  new connection is refused at once (the MTA applies its
  milter_default_action, or reaches the instance that replaces this one);
  each worker finishes its open sessions with their real answers (up to
  milter.drain_timeout) and exits as soon as it has none.  The stop goes to
  the workers through their pipes, never as a signal: libmilter's own
  SIGTERM handling stops serving the open sessions too (its worker pool
  polls no session once the stop flag is set), which froze them until the
  drain timeout ended in a reset.
- SIGCHLD: a worker that died is replaced.

With `metrics.listen` set, the supervisor also serves /metrics from a
thread, adding up the figures the workers write (milterguard/metrics.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("milterguard.server")


@dataclass
class Worker:
    pid: int
    pipe: int  # write end: the supervisor's messages to the worker
    started: float


def _register_callbacks(name: str) -> None:
    """Wire libmilter to the adapter class (what Milter.runmilter does, minus opening and running)."""
    import Milter
    from Milter import milter

    from milterguard.milter import MilterguardMilter

    Milter.factory = MilterguardMilter
    # pymilter decodes the HELO and client host names strictly, before any code of
    # ours runs; a name that is not UTF-8 would otherwise tempfail the whole session.
    # Our callbacks catch their own errors, so CONTINUE only covers that decoding.
    milter.set_exception_policy(milter.CONTINUE)
    milter.set_flags(milter.ADDHDRS | milter.CHGHDRS | milter.DELRCPT | milter.QUARANTINE | milter.SETSYMLIST)
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.register(
        name,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


class Supervisor:
    """Owns the socket and the workers; reloads on SIGHUP."""

    def __init__(self, engine, load_engine, socket_spec: str, workers: int) -> None:
        self.engine = engine  # what new workers fork with
        self.load_engine = load_engine  # () -> Engine from the files, raising on a broken configuration
        self.socket_spec = socket_spec
        self.nworkers = workers
        self.workers: dict[int, Worker] = {}
        self.pending: list[int] = []
        self.stopping = False
        self.listen_fds: list[int] = []
        self.socket_file: tuple[int, int] | None = None  # the unix socket file this instance made
        self.exporter = None  # metrics.Exporter, when metrics.listen is set
        self.restarts = 0  # workers that died and were replaced
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # ------------------------------------------------------------ signals

    def _queue(self, signum: int, _frame) -> None:
        # The handler only queues; the main loop does the work.
        self.pending.append(signum)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        from Milter import milter

        _register_callbacks(self.engine.config["milter.name"])
        milter.setconn(self.socket_spec)
        milter.settimeout(int(self.engine.config["milter.timeout"]))
        milter.setbacklog(128)
        before = _listening_fds()
        # A unix socket is made with its mode (by the umask), never wider for a moment.
        umask = os.umask(0o777 & ~self._socket_mode_bits())
        try:
            milter.opensocket(True)
        except milter.error as exc:
            log.error("cannot open milter socket %s: %s", self.socket_spec, exc)
            return 1
        finally:
            os.umask(umask)
        self.listen_fds = sorted(_listening_fds() - before)
        for fd in self.listen_fds:
            # Every worker's accept loop wakes for each new connection; the ones that
            # lose the race must get EAGAIN (libmilter polls again) rather than block
            # in accept(), where a stop could not take the socket away from them.
            os.set_blocking(fd, False)
        self._socket_mode()
        self.socket_file = _file_id(self._socket_path())
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._queue)
        arenas = self.engine.config["milter.malloc_arenas"]
        if arenas and not limit_malloc_arenas(arenas):
            log.warning("milter.malloc_arenas: this C library has no mallopt(M_ARENA_MAX); not limited")
        self._start_metrics()
        log.info("milterguard listening on %s with %d worker%s, %d rules", self.socket_spec, self.nworkers,
                 "" if self.nworkers == 1 else "s",
                 len(self.engine.ruleset.rules))
        for _ in range(self.nworkers):
            self._spawn()
        while True:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            while self.pending:
                signum = self.pending.pop(0)
                if signum == signal.SIGHUP:
                    self._reload()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    return self._shutdown()
                elif signum == signal.SIGCHLD:
                    self._reap()
            self._reap()
            import select

            select.select([self._wake_r], [], [], 1.0)

    def _start_metrics(self) -> None:
        """/metrics, when metrics.listen is set (read at start only); a failure leaves the mail alone."""
        config = self.engine.config
        if not config["metrics.listen"]:
            return
        from milterguard.metrics import Exporter, disable

        exporter = Exporter(config, lambda: list(self.workers), lambda: self.restarts)
        try:
            exporter.prepare()
            exporter.start()
        except Exception as exc:  # noqa: BLE001 - the filter serves mail without its metrics
            log.error("metrics off: cannot serve them on %s: %s", config["metrics.listen"], exc)
            exporter.stop()
            disable()
            return
        self.exporter = exporter

    def _socket_path(self) -> str | None:
        """The path of a unix socket, None for a TCP one."""
        spec = self.socket_spec
        if spec.startswith(("unix:", "local:")) or spec.startswith("/"):
            return spec.split(":", 1)[1] if ":" in spec else spec
        return None

    def _socket_mode_bits(self) -> int:
        return int(self.engine.config["milter.unix_socket_mode"].removeprefix("0o"), 8)

    def _socket_mode(self) -> None:
        path = self._socket_path()
        if path is not None:
            try:
                os.chmod(path, self._socket_mode_bits())
            except OSError as exc:
                log.error("cannot set mode of %s: %s", path, exc)

    def _spawn(self) -> None:
        read_end, write_end = os.pipe()
        # Keep the objects the workers inherit (the engine, the loaded modules) out of the
        # collector's reach, so that its passes do not copy the shared pages into each worker.
        gc.freeze()
        with self.exporter.forking() if self.exporter is not None else contextlib.nullcontext():
            pid = os.fork()  # not in the middle of the metrics' quarantine query (metrics.Exporter.forking)
        if pid == 0:
            os.close(write_end)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for fd in [w.pipe for w in self.workers.values()]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if self.exporter is not None:
                self.exporter.in_child()
            code = 1
            try:
                code = worker_main(self.engine, read_end, self.load_engine, self.listen_fds)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(read_end)
        self.workers[pid] = Worker(pid=pid, pipe=write_end, started=time.monotonic())
        log.info("worker %d started", pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)  # wait4: the CPU time it used, for the metrics
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.pipe)
            if self.exporter is not None:
                self.exporter.process_dead(pid, usage.ru_utime + usage.ru_stime)
            if self.stopping:
                continue
            self.restarts += 1
            how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {os.WEXITSTATUS(status)}"
            log.error("worker %d died (%s); starting a new one", pid, how)
            if time.monotonic() - worker.started < 1.0:
                time.sleep(0.5)  # a worker that dies at once must not spin the supervisor
            self._spawn()

    def _reload(self) -> None:
        try:
            engine = self.load_engine()
        except Exception as exc:  # noqa: BLE001 - any fault in the new rules keeps the old ones
            log.error("reload refused, still serving the previous configuration: %s", str(exc).replace("\n", " | "))
            return
        self.engine = engine  # workers started from now on fork with it
        log.info("configuration reloaded: %d rules; telling %d workers", len(engine.ruleset.rules), len(self.workers))
        for worker in list(self.workers.values()):
            try:
                os.write(worker.pipe, b"reload\n")
            except OSError as exc:
                log.warning("worker %d did not take the reload: %s", worker.pid, exc)

    def _shutdown(self) -> int:
        self.stopping = True
        started = time.monotonic()
        log.info("stopping %d workers", len(self.workers))
        for fd in self.listen_fds:
            os.close(fd)
        for worker in list(self.workers.values()):
            try:
                os.write(worker.pipe, b"stop\n")
            except OSError as exc:
                log.warning("worker %d did not take the stop (%s); sending SIGTERM", worker.pid, exc)
                try:
                    os.kill(worker.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.engine.config["milter.drain_timeout"] + 5
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            worker = self.workers.pop(pid, None)
            if worker is not None:
                os.close(worker.pipe)
        for pid in list(self.workers):
            log.warning("worker %d did not stop in time; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._remove_socket()
        if self.exporter is not None:
            self.exporter.stop()
        log.info("stopped in %.1fs", time.monotonic() - started)
        return 0

    def _remove_socket(self) -> None:
        # Only the file this instance created: on a restart, the new instance may have
        # bound the path already, and its socket must stay.
        path = self._socket_path()
        if path is not None and self.socket_file is not None and _file_id(path) == self.socket_file:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("cannot remove socket %s: %s", path, exc)


M_ARENA_MAX = -8  # glibc's malloc.h


def limit_malloc_arenas(count: int) -> bool:
    """At most COUNT malloc arenas in this process and the workers it forks from now on.

    glibc gives a thread that finds every arena busy a new one, up to eight per
    core; each arena keeps the free memory of the largest messages its threads
    handled.  libmilter runs every session in a new thread, so a worker ends
    up with all of them.  False where mallopt or M_ARENA_MAX is missing (not
    glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, count) == 1


def _file_id(path: str | None) -> tuple[int, int] | None:
    """(device, inode) of the socket at *path*, None when there is none."""
    if path is None:
        return None
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if stat.S_ISSOCK(found.st_mode) else None


def _own_sockets():
    """(descriptor, socket object) for each socket this process holds, the object borrowed:
    it is detached again when the caller moves on, so the descriptor stays open."""
    import socket

    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            yield fd, sock
        finally:
            sock.detach()


def _listening_fds() -> set[int]:
    """The descriptors of this process that are listening sockets."""
    import socket

    found = set()
    for fd, sock in _own_sockets():
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.add(fd)
        except OSError:
            pass
    return found


def _stop_accepting(listen_fds: list[int]) -> set:
    """Take this worker's share of the milter socket away from libmilter's accept loop.

    Each descriptor is replaced (dup2, atomic) by a listening socket no one is
    told of (an abstract unix name), so that the loop goes on polling without
    ever accepting again and without setting libmilter's stop flag, which would
    orphan the open sessions.  Once every process has let go of it, the kernel
    closes the milter socket and refuses new connections.  Returns the addresses
    the socket listened on.
    """
    import socket

    addresses = set()
    for fd in listen_fds:
        family = socket.socket(fileno=fd)
        try:
            addresses.add(family.getsockname())
        finally:
            family.detach()
        unreachable = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unreachable.bind("")  # Linux: an abstract name of the kernel's choosing
        unreachable.listen(1)
        os.dup2(unreachable.fileno(), fd)
        unreachable.close()
    # A poll under way holds the old socket until it returns (up to 5 s), and a
    # connection to it would not end it: poll looks again at the descriptor, now
    # the new socket.  A signal does end it (EINTR), and libmilter polls again.
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
    return addresses


def _milter_connections(addresses: set) -> int:
    """The milter sessions this process holds: its connected sockets on the milter socket's address.

    Counted at the socket rather than in the callbacks, because the MTA's first
    commands of a session (connect, HELO, MAIL FROM) need no reply and may reach
    the callbacks only with the first one that does.
    """
    import socket

    count = 0
    for _fd, sock in _own_sockets():
        try:
            if sock.getsockname() in addresses and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.getpeername()  # raises unless connected
                count += 1
        except OSError:
            pass
    return count


def _drain_and_exit(engine, listen_fds: list[int]) -> None:
    """The stop, in a worker: refuse new sessions, let the open ones end, and exit."""
    addresses = _stop_accepting(listen_fds)
    drain = engine.config["milter.drain_timeout"]
    started = time.monotonic()
    deadline = started + drain
    open_now = _milter_connections(addresses)
    if open_now:
        log.info("worker %d: stopping; %d open sessions to finish", os.getpid(), open_now)
    while open_now and time.monotonic() < deadline:
        time.sleep(0.02)
        open_now = _milter_connections(addresses)
    if open_now:
        log.warning("worker %d: %d sessions still open after %.0fs; they get the MTA's default action",
                    os.getpid(), open_now, drain)
    else:
        log.info("worker %d: stopped in %.1fs", os.getpid(), time.monotonic() - started)
    from milterguard import metrics

    metrics.flush()
    logging.shutdown()
    os._exit(1 if open_now else 0)


def worker_main(engine, pipe_fd: int, load_engine, listen_fds: list[int] = ()) -> int:
    """Run libmilter's loop in this process until told to stop."""
    from Milter import milter

    from milterguard import metrics
    from milterguard.milter import SESSIONS, MilterguardMilter

    metrics.start_recording()
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    # Only to interrupt libmilter's poll on the stop (_stop_accepting): caught, so that
    # the call returns EINTR; the Python handler itself never gets to run.
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: None)
    MilterguardMilter.current_engine = engine

    def listen_for_reload() -> None:
        # libmilter's own thread must be the one that takes SIGTERM; left unblocked
        # here, the default action would kill the worker without draining.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
        with os.fdopen(pipe_fd, "rb", buffering=0) as pipe:
            buf = b""
            while True:
                try:
                    chunk = pipe.read(64)
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    return
                if not chunk:
                    return  # the supervisor is gone
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line == b"stop":
                        _drain_and_exit(MilterguardMilter.current_engine, list(listen_fds))
                    if line == b"reload":
                        try:
                            MilterguardMilter.current_engine = load_engine()
                            log.info("worker %d: new configuration in use for new connections", os.getpid())
                        except Exception as exc:  # noqa: BLE001
                            log.error("worker %d: reload failed, keeping the old rules: %s", os.getpid(), exc)

    threading.Thread(target=listen_for_reload, name="reload", daemon=True).start()
    try:
        # libmilter blocks SIGHUP/SIGTERM/SIGINT in its threads and handles them in its
        # own: SIGTERM stops the accept loop, and main() returns.
        milter.main()
    except milter.error as exc:
        log.error("worker %d: libmilter failed: %s", os.getpid(), exc)
        return 1
    drain = engine.config["milter.drain_timeout"]
    if SESSIONS.open:
        log.info("worker %d: draining %d open sessions", os.getpid(), SESSIONS.open)
        if not SESSIONS.wait_idle(drain):
            log.warning("worker %d: %d sessions still open after %.0fs", os.getpid(), SESSIONS.open, drain)
    metrics.flush()
    return 0


class _Formatter(logging.Formatter):
    """The standard format, with the date text made once per second rather than per line."""

    _cached: tuple[int, str] = (-1, "")

    def formatTime(self, record, datefmt=None) -> str:  # noqa: N802 - logging's name
        second = int(record.created)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
        return f"{cached[1]},{int(record.msecs):03d}"


def setup_logging(config=None, stream=None) -> None:
    """stderr (the journal under systemd) or syslog, one line per event.

    Without a configuration (before it is read): stderr at INFO, in the same
    format, so that no line of a start goes out without its time and level.
    """
    # The formats name no source line, thread or process name: spare each record the
    # stack walk and look-ups that would fill them in (logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # Python's warnings (a library's deprecation, say) become log lines too.
    logging.captureWarnings(True)
    if config is not None and config["log.target"] == "syslog":
        from logging.handlers import SysLogHandler

        handler: logging.Handler = SysLogHandler(address=config["log.syslog_socket"], facility=config["log.syslog_facility"])
        handler.setFormatter(logging.Formatter("milterguard[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(_Formatter("%(asctime)s milterguard[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(config["log.level"].upper() if config is not None else logging.INFO)
