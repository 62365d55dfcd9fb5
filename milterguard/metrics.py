"""Prometheus metrics of the filter (docs/metrics.md).

Off unless `metrics.listen` is set.  The supervisor then makes a private
directory, points prometheus_client's multiprocess mode at it
(PROMETHEUS_MULTIPROC_DIR, before prometheus_client is first imported: the
library picks its value store at import), and creates the metrics; the
workers it forks inherit them, and each writes its figures to its own
memory-mapped files there (prometheus_client opens new files when it sees a
new process id).  The supervisor serves /metrics from a thread of its own,
adding up the files of every worker, live or gone: the counters of a worker
that died stay counted, its gauges of the `live*` kinds are dropped
(`mark_process_dead`).

A worker adds its figures up in memory and writes them to its files every
FLUSH_SECONDS (and when it stops), so that a message costs a few dictionary
updates rather than some thirty writes; a worker killed outright loses what
it counted in its last FLUSH_SECONDS.

Only the workers write to these files.  The supervisor's own figures (the
workers, the quarantine's size, its memory) are read when a scrape asks,
from what its main loop and a polling thread keep in plain attributes, so
that no thread of the supervisor holds prometheus_client's lock when it
forks a worker; for the same reason its threads import nothing (the main
thread imports what they need) and the poll's query runs under `fork_gate`.

Recording never fails the mail path: each entry point catches its own
errors, logs the first of each kind and goes on.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time

from milterguard.clients import outage as outage_mod
from milterguard.model import Verdict
from milterguard.settingtypes import parse_listen_address

log = logging.getLogger("milterguard.metrics")

# Check times: from a tenth of a millisecond (most pattern checks) to the
# timeouts of network checks.
CHECK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0)
SCAN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Labels of milterguard_messages_total besides the actions: the filter failed and
# answered by actions.on_error.
ERROR_ACTION = "error"

_created: "_Metrics | None" = None  # made in this process (or inherited from the supervisor)
_metrics: "_Metrics | None" = None  # the same, once this process records
_reported: set[str] = set()
_saved: "str | None | bool" = False  # PROMETHEUS_MULTIPROC_DIR before enable() (False: not enabled)


def _once(where: str, exc: BaseException) -> None:
    """An error of the metrics: logged the first time for each place, then ignored."""
    if where not in _reported:
        _reported.add(where)
        log.error("metrics: %s failed, figures may be missing (logged once): %s: %s", where, type(exc).__name__, exc)


def prepare_directory(configured: str) -> tuple[str, bool]:
    """The directory of the figures, emptied, mode 0700: (path, made by us).

    Empty CONFIGURED makes a new one under the system's temporary directory.
    A configured one is made if missing and set to mode 0700; one that another
    user owns is refused.
    """
    if not configured:
        return tempfile.mkdtemp(prefix="milterguard-metrics-"), True
    os.makedirs(configured, mode=0o700, exist_ok=True)
    found = os.stat(configured)
    if found.st_uid != os.getuid():
        raise ValueError(f"metrics.directory {configured}: owned by another user")
    os.chmod(configured, 0o700)
    for name in os.listdir(configured):
        if name.endswith(".db"):
            os.unlink(os.path.join(configured, name))
    return configured, False


class _Metrics:
    """The metrics the workers write (created once, in the supervisor, before it forks)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: none is registered in this process; the supervisor's collector reads the files.
        self.messages = Counter("milterguard_messages", "Messages by the action applied to them (error: "
                                "answered by actions.on_error after an internal error).", ["action"], registry=None)
        self.rcpts_refused = Counter("milterguard_recipients_refused", "Recipients refused alone at RCPT "
                                     "(a block entry of their domain's list).", registry=None)
        self.symbols = Counter("milterguard_symbol_hits", "Messages each symbol hit.", ["symbol"], registry=None)
        self.checks = Histogram("milterguard_check_duration_seconds", "Time of each check, rule kind and step "
                                "of the engine per message (the timings of scan --explain).", ["check"],
                                buckets=CHECK_BUCKETS, registry=None)
        self.scan = Histogram("milterguard_scan_duration_seconds", "Time the engine worked on a message: the "
                              "sum of its check times.", buckets=SCAN_BUCKETS, registry=None)
        self.message = Histogram("milterguard_message_duration_seconds", "From MAIL FROM to the verdict, the "
                                 "client's own pace included.", buckets=SCAN_BUCKETS, registry=None)
        self.sessions = Gauge("milterguard_sessions_in_flight", "SMTP sessions open in the workers.",
                              multiprocess_mode="livesum", registry=None)
        self.dep_up = Gauge("milterguard_dependency_up", "Whether a dependency answered at the last call (1) or "
                            "is away (0), as the most recent worker to call it found it.",
                            ["dependency", "name"], multiprocess_mode="livemostrecent", registry=None)
        self.dep_failures = Counter("milterguard_dependency_failures", "Calls to a dependency that failed.",
                                    ["dependency"], registry=None)
        self.dep_skipped = Counter("milterguard_dependency_skipped", "Calls not made because the dependency was "
                                   "away (its back-off): the checks reported their *_TEMPFAIL symbol.",
                                   ["dependency"], registry=None)
        self.errors = Counter("milterguard_filter_errors", "Answers made by actions.on_error: an internal "
                              "error in a milter callback (stage), or the quarantine failing to store.", ["stage"],
                              registry=None)
        self._check_children: dict[str, "_Hist"] = {}
        self._symbol_children: dict[str, object] = {}
        self._action_children: dict[str, object] = {}
        self.scan_hist = _Hist(self.scan)
        self.message_hist = _Hist(self.message)
        # What this process counted since the last flush: counter child -> amount.
        self.pending: dict[object, float] = {}
        self.lock = threading.Lock()

    def check(self, name: str) -> "_Hist":
        child = self._check_children.get(name)
        if child is None:
            child = self._check_children[name] = _Hist(self.checks.labels(name))
        return child

    def flush(self) -> None:
        """Write what was counted since the last flush into this process's files."""
        with self.lock:
            pending, self.pending = self.pending, {}
            hists = [h for h in (*self._check_children.values(), self.scan_hist, self.message_hist) if h.dirty]
            taken = [h.take() for h in hists]
            actions = set(self._action_children.values())
        # The messages by action last: a scrape that counts a message sees its symbols and
        # timings too.
        for hist, (counts, total) in zip(hists, taken):
            hist.write(counts, total)
        for child, amount in sorted(pending.items(), key=lambda item: item[0] in actions):
            child.inc(amount)

    def symbol(self, name: str):
        child = self._symbol_children.get(name)
        if child is None:
            child = self._symbol_children[name] = self.symbols.labels(name)
        return child

    def action(self, name: str):
        child = self._action_children.get(name)
        if child is None:
            child = self._action_children[name] = self.messages.labels(name)
        return child


class _Hist:
    """A histogram's observations, added up in this process until the next flush.

    prometheus_client writes each observation to the memory-mapped file at once (two
    values, each under its lock); a message has some thirty timings, so the workers add
    them up here and write each series once per flush instead.
    """

    __slots__ = ("child", "bounds", "counts", "total", "dirty")

    def __init__(self, child) -> None:
        self.child = child
        self.bounds = list(child._upper_bounds)  # the buckets, +Inf last
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.dirty = False

    def observe(self, seconds: float) -> None:  # under _Metrics.lock
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1  # the first bucket with le >= seconds
        self.total += seconds
        self.dirty = True

    def take(self) -> tuple[list[int], float]:  # under _Metrics.lock
        taken = (self.counts, self.total)
        self.counts, self.total, self.dirty = [0] * len(self.bounds), 0.0, False
        return taken

    def write(self, counts: list[int], total: float) -> None:
        # A multiprocess histogram keeps each bucket's own count (not cumulative) and the sum,
        # as Histogram.observe writes them; the collector adds the buckets up at a scrape.
        self.child._sum.inc(total)
        for bucket, count in zip(self.child._buckets, counts):
            if count:
                bucket.inc(count)


def enable(directory: str) -> None:
    """Multiprocess mode in DIRECTORY, and the metrics; before any worker is forked.

    The metrics are made here, but only written once `start_recording` is called
    (in each worker): the supervisor writes none.
    """
    global _created, _saved
    _saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    # The library picks its value store when first imported, by the variable; here it
    # may have been imported before, or reset by disable().
    values.ValueClass = values.get_value_class()
    _created = _Metrics()


FLUSH_SECONDS = 0.5  # how often a worker writes what it counted
FORK_WAIT = 2.0  # longest a fork waits for the quarantine poll
_flusher: "tuple[threading.Thread, threading.Event] | None" = None


def start_recording() -> None:
    """In a worker (or the benchmark): record from now on, starting with the state of the
    dependencies its engine knows already, and write the figures every FLUSH_SECONDS."""
    global _metrics, _flusher
    if _created is None:
        return
    _metrics = _created
    stop = threading.Event()
    thread = threading.Thread(target=_flush_loop, args=(_created, stop), name="metrics-flush", daemon=True)
    thread.start()
    _flusher = (thread, stop)
    if _outage_event not in outage_mod.observers:
        outage_mod.observers.append(_outage_event)
    for found in outage_mod.known():
        _outage_event(found, "new")


def _flush_loop(m: _Metrics, stop: threading.Event) -> None:
    while not stop.wait(FLUSH_SECONDS):
        flush(m)


def flush(m: "_Metrics | None" = None) -> None:
    """Write what this process counted (the flusher does it every FLUSH_SECONDS; a worker that
    stops does it last)."""
    m = m or _metrics
    if m is None:
        return
    try:
        m.flush()
    except Exception as exc:  # noqa: BLE001
        _once("writing the figures", exc)


def disable() -> None:
    """Stop recording in this process, writing what was counted."""
    global _metrics, _created, _flusher, _saved
    if _flusher is not None:
        _flusher[1].set()
        _flusher[0].join(5)
        _flusher = None
    flush()
    _metrics = _created = None
    if _saved is not False:  # as before enable(): the benchmark and the tests go on in this process
        if _saved is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = _saved
        _saved = False
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    if _outage_event in outage_mod.observers:
        outage_mod.observers.remove(_outage_event)


# ---------------------------------------------------------------- the workers' side


def record_verdict(verdict: Verdict) -> None:
    """A verdict the milter answered with: its action, symbols and times."""
    m = _metrics
    if m is None:
        return
    try:
        with m.lock:
            pending = m.pending
            if verdict.rcpt:
                pending[m.rcpts_refused] = pending.get(m.rcpts_refused, 0) + 1
                return
            child = m.action(verdict.applied.label)
            pending[child] = pending.get(child, 0) + 1
            for hit in verdict.hits:
                child = m.symbol(hit.symbol)
                pending[child] = pending.get(child, 0) + 1
            total = 0.0
            for name, seconds in verdict.timings.items():
                if seconds > 0.0:  # 0.0: skipped, the message being settled already
                    m.check(name).observe(seconds)
                    total += seconds
            m.scan_hist.observe(total)
            m.message_hist.observe(verdict.elapsed)
    except Exception as exc:  # noqa: BLE001 - metrics never fail a message
        _once("recording a verdict", exc)


_CALLBACKS = frozenset(("connect", "helo", "envfrom", "envrcpt", "header", "eoh", "body", "eom"))


def record_error(where: str) -> None:
    """The filter failed (in a milter callback, or storing in the quarantine) and answered by
    actions.on_error.  A failed store follows a review verdict counted already: it is
    counted as an error of the quarantine, not as a second message."""
    m = _metrics
    if m is None:
        return
    try:
        if where in _CALLBACKS:
            m.errors.labels(where).inc()
            m.action(ERROR_ACTION).inc()
        else:
            m.errors.labels("quarantine" if "quarantine" in where else "other").inc()
    except Exception as exc:  # noqa: BLE001
        _once("recording an error", exc)


def session_opened() -> None:
    m = _metrics
    if m is not None:
        try:
            m.sessions.inc()
        except Exception as exc:  # noqa: BLE001
            _once("counting sessions", exc)


def session_closed() -> None:
    m = _metrics
    if m is not None:
        try:
            m.sessions.dec()
        except Exception as exc:  # noqa: BLE001
            _once("counting sessions", exc)


def dependency(kind: str, name: str, up: bool) -> None:
    """A call to a dependency worked (UP) or failed; failures are counted."""
    m = _metrics
    if m is None:
        return
    try:
        m.dep_up.labels(kind, name).set(1 if up else 0)
        if not up:
            m.dep_failures.labels(kind).inc()
    except Exception as exc:  # noqa: BLE001
        _once("recording a dependency", exc)


def _outage_event(outage: outage_mod.Outage, event: str) -> None:
    m = _metrics
    if m is None:
        return
    try:
        if event == "skipped":
            m.dep_skipped.labels(outage.kind).inc()
        elif event == "failed":
            m.dep_failures.labels(outage.kind).inc()
            m.dep_up.labels(outage.kind, outage.name).set(0)
        else:  # "new", "up"
            m.dep_up.labels(outage.kind, outage.name).set(0 if outage.down else 1)
    except Exception as exc:  # noqa: BLE001
        _once("recording a dependency", exc)


# ---------------------------------------------------------------- the supervisor's side


class Exporter:
    """/metrics on `metrics.listen`, served by a thread of the supervisor.

    WORKERS is a callable giving the process ids of the live workers;
    RESTARTS one giving how many died and were replaced.
    """

    def __init__(self, config, workers, restarts) -> None:
        self.config = config
        self.workers, self.restarts = workers, restarts
        self.directory, self._made = "", False
        self.server = None
        self.started = time.time()
        self.quarantine: tuple[int, int] | None = None  # (messages, bytes) at the last poll
        self.dead_cpu = 0.0  # CPU seconds of the workers that have exited
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Held by the poll while it queries and by the supervisor while it forks: a worker
        # forked in the middle of a query would inherit the locks the query holds (SQLAlchemy's,
        # the database driver's) locked for good, and hang at its first store in the quarantine.
        self.fork_gate = threading.Lock()

    def prepare(self) -> None:
        """Before the first fork: the directory and the metrics."""
        self.directory, self._made = prepare_directory(self.config["metrics.directory"])
        enable(self.directory)

    def start(self) -> None:
        """Serve /metrics (and start the quarantine poll)."""
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        host, port = parse_listen_address(self.config["metrics.listen"])
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        ProcessCollector(registry=registry)
        registry.register(_SupervisorCollector(self))
        self.server, _thread = start_http_server(port, addr=host, registry=registry)
        interval = self.config["metrics.quarantine_interval"]
        if interval > 0 and self.config["quarantine.mode"] == "store":
            # Imported here, in the main thread: a worker forked while another thread holds a
            # module's import lock would wait for that lock for ever at its own first import of
            # it (per-module import locks are not reset in the child).
            from milterguard.stores import quarantine

            self._poller = threading.Thread(target=self._poll, args=(interval, quarantine),
                                            name="metrics-quarantine", daemon=True)
            self._poller.start()
        log.info("metrics on http://%s/metrics", self.config["metrics.listen"])

    @contextlib.contextmanager
    def forking(self, wait: float = FORK_WAIT):
        """Around the supervisor's fork: not in the middle of the quarantine poll, unless the
        poll has been waiting on the database for WAIT seconds (a database that stopped
        answering must not keep a dead worker from being replaced; the poll is then in the
        driver's network wait, holding no lock a worker would need)."""
        held = self.fork_gate.acquire(timeout=wait)
        if not held:
            log.warning("metrics: the quarantine's size query has run for %gs; forking a worker meanwhile", wait)
        try:
            yield
        finally:
            if held:
                self.fork_gate.release()  # in the supervisor and in the new worker, each its own copy

    def in_child(self) -> None:
        """In a new worker: let go of the supervisor's listening socket."""
        if self.server is not None:
            try:
                self.server.socket.close()
            except OSError:
                pass

    def process_dead(self, pid: int, cpu_seconds: float = 0.0) -> None:
        """A worker has exited: its CPU time joins that of the workers gone, its live gauges go."""
        self.dead_cpu += cpu_seconds
        try:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, self.directory)
        except Exception as exc:  # noqa: BLE001
            _once("dropping a dead worker's gauges", exc)

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self._made and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        disable()

    def _poll(self, interval: float, quarantine) -> None:
        store = None
        while not self._stop.is_set():
            try:
                with self.fork_gate:  # the database driver may import its modules at first use
                    if store is None:
                        store = quarantine.open_quarantine(self.config)
                    self.quarantine = store.size()
            except (quarantine.QuarantineError, OSError) as exc:
                self.quarantine = None
                _once("reading the quarantine's size", exc)
            self._stop.wait(interval)


class _SupervisorCollector:
    """The supervisor's figures, read at each scrape from plain attributes and /proc."""

    def __init__(self, exporter: Exporter) -> None:
        # Imported here, in the main thread, not by the first scrape (see Exporter.start).
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from milterguard import __version__

        self.exporter = exporter
        self.counter, self.gauge, self.version = CounterMetricFamily, GaugeMetricFamily, __version__

    def collect(self):
        CounterMetricFamily, GaugeMetricFamily = self.counter, self.gauge  # noqa: N806 - the library's names
        ex = self.exporter
        pids = list(ex.workers())
        info = GaugeMetricFamily("milterguard_build_info", "The version of the filter.", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        yield GaugeMetricFamily("milterguard_start_time_seconds", "When the supervisor started (Unix time).",
                                value=ex.started)
        yield GaugeMetricFamily("milterguard_workers", "Worker processes alive.", value=len(pids))
        yield CounterMetricFamily("milterguard_worker_restarts", "Workers that died and were replaced.",
                                  value=ex.restarts())
        rss, cpu = 0, ex.dead_cpu
        for pid in pids:
            found = _proc_figures(pid)
            if found is not None:
                rss += found[0]
                cpu += found[1]
        yield GaugeMetricFamily("milterguard_workers_resident_memory_bytes", "Resident memory of the workers, "
                                "added up.", value=rss)
        yield CounterMetricFamily("milterguard_workers_cpu_seconds", "CPU time of the workers, those gone "
                                  "included, added up.", value=cpu)
        if ex.quarantine is not None:
            yield GaugeMetricFamily("milterguard_quarantine_messages", "Messages held in the quarantine (read "
                                    "every metrics.quarantine_interval).", value=ex.quarantine[0])
            yield GaugeMetricFamily("milterguard_quarantine_size_bytes", "Bytes held in the quarantine.",
                                    value=ex.quarantine[1])


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_figures(pid: int) -> tuple[int, float] | None:
    """(resident bytes, CPU seconds) of a process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command: state(0) ... utime(11) stime(12) ... rss(21), in pages.
    return int(fields[21]) * _PAGE, (int(fields[11]) + int(fields[12])) / _TICKS
