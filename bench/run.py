#!/usr/bin/env python3
"""End-to-end throughput, latency and memory of milterguard against its peers.

    python bench/run.py [--quick] [--rounds N] [--messages M]
                        [--concurrency 1,8,32] [--configs a,b,c,d]
                        [--out bench/results/NAME.json] [--update-doc]

Each configuration gets a private Postfix (tests/support/postfix.py) on
loopback that relays to its own ``smtp-sink``; ``smtp-source`` feeds it one
real ~4 KB spam from the shared corpus, one message per connection:

  a  Postfix alone (no milter)
  b  the no-op pymilter milter (tests/support/noop_milter.py)
  c  milterguard serve, default rules and workers, actions.mode=tag-only,
     DNS answered by a local nsd authoritative for the sender's domain (the
     client is 127.0.0.1, for which auth.skip_authenticated skips SPF and
     DMARC, and the message is unsigned: c asks its nsd next to nothing)
  d  Rspamd 3.4 (Debian), proxy worker in milter mode, self_scan, offline
  e  (only when asked for) milterguard as c with --e-set / --e-workers on top,
     to compare a change with c in the same interleaved rounds
  f  milterguard in the full configuration (bench/full.py): as c, plus Bayes,
     the classifier and the fuzzy hashes in a local Redis learned from the
     corpus's train split, and SPF, DKIM, DMARC and ARC records in its nsd for
     a signed and ARC-sealed copy of the message
  g  Rspamd in the same full configuration: its spf, dkim, dmarc and arc
     modules on and resolving through its own such nsd, Bayes in its own
     Redis, learned from the same messages with rspamc

``--configs`` takes letters or the groups ``today`` (c,d) and ``full`` (f,g).

Rounds are interleaved (for each round, for each concurrency: a b c d f g) so
that drift hits all alike.  A round runs from the moment smtp-source is
started to the moment the sink counted the last message.  See
docs/performance.md for the method and the results.  Needs root (Postfix),
postfix (smtp-source, smtp-sink), pymilter, and for d and g ``apt-get install
rspamd``, for f and g nsd and redis-server; the profile needs ``pip install py-spy``.

This is not part of the test suite.  Every load loop is bounded in count
and in time; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import email.parser
import email.policy
import email.utils
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))  # this tree's milterguard, not an installed one

from support import SupportError, session_members, wait_until  # noqa: E402
from support.milterguard_proc import MilterguardProcess, parse_verdicts  # noqa: E402
from support.noop_milter import NoopMilterProcess  # noqa: E402
from support.postfix import PostfixInstance, postfix_available  # noqa: E402

from loadgen import SMTP_SINK, SMTP_SOURCE, SinkCounter, latency_probe, run_smtp_source  # noqa: E402
from procmem import CLK_TCK, MemSampler, cpu_seconds, sample  # noqa: E402
import pyspy  # noqa: E402
from rspamd import RSPAMD, RspamdInstance  # noqa: E402
import full  # noqa: E402

CORPUS = Path(os.environ.get("MILTERGUARD_CORPUS", "/work/shared/corpus"))
DEFAULT_MESSAGE = CORPUS / "spamassassin/spam/00009.027bf6e0b0c4ab34db3ce0ea4bf2edab.eml"
RCPT = "user@example.net"
HS_CACHE = Path("/var/tmp/milterguard-bench/rspamd-hs")

MILTERGUARD = ("c", "e", "f")  # e: milterguard with --e-set/--e-workers, to compare a change in one run
RSPAMD_KEYS = ("d", "g")
FILTERS = MILTERGUARD + RSPAMD_KEYS
FULL = ("f", "g")  # the full configuration (bench/full.py)
CONFIG_NAMES = {
    "a": "Postfix alone",
    "b": "no-op pymilter",
    "c": "milterguard",
    "e": "milterguard, variant",
    "d": "Rspamd 3.4",
    "f": "milterguard, full",
    "g": "Rspamd 3.4, full",
}
CONFIG_GROUPS = {"today": ("c", "d"), "full": FULL}

# Postfix settings for a load test (on top of tests/support/postfix.py's).
POSTFIX_BENCH_CF = {
    # in_flow_delay (1 s by default) stalls smtpd when the queue is busy.
    "in_flow_delay": "0",
    # 32 smtpd + delivery agents + cleanup must fit (default 100).
    "default_process_limit": "200",
    "smtpd_client_connection_count_limit": "0",
    "smtpd_client_message_rate_limit": "0",
    # A milter failure must show as a missing delivery, not as accepted mail.
    "milter_default_action": "tempfail",
}


# A round during which other processes of the machine used more than this much
# CPU (percent of one core) is flagged as disturbed.
DISTURBED = 50.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# the systems under test
# ---------------------------------------------------------------------------

@dataclass
class System:
    """One configuration: a Postfix, its sink, and its milter (if any)."""

    key: str
    name: str
    workdir: Path
    sink: SinkCounter
    postfix: PostfixInstance | None = None
    milter: object | None = None  # NoopMilterProcess | MilterguardProcess | RspamdInstance
    dns: object | None = None  # the local nsd milterguard asks (c, f) or Rspamd asks (g)
    redis: object | None = None  # the Redis of Bayes (f, g)
    message: Path | None = None  # what this configuration is sent, when not the common message (f, g)
    learning: dict = field(default_factory=dict)
    socket: str | None = None
    error: str | None = None
    failures: int = 0
    problems: list[str] = field(default_factory=list)
    _log_offset: int = 0

    def milter_pids(self) -> list[int]:
        m = self.milter
        if m is None:
            return []
        if isinstance(m, RspamdInstance):
            return m.pids()
        proc = getattr(m, "proc", None)
        if proc is None or proc.poll() is not None:
            return []
        return session_members(proc.pid)

    def milter_log(self) -> Path | None:
        m = self.milter
        if m is None:
            return None
        return m.log_file

    def aux_pids(self) -> list[int]:
        """The filter's helpers: its nsd (c, f, g) and its Redis (f, g)."""
        pids = []
        for thing in (self.dns, self.redis):
            proc = getattr(thing, "proc", None)
            if proc is not None and proc.poll() is None:
                pids += session_members(proc.pid) or [proc.pid]
        return sorted(set(pids))

    def postfix_pids(self) -> list[int]:
        if self.postfix is None:
            return []
        return self.postfix.session_pids()

    def stop(self) -> None:
        if self in LIVE:
            LIVE.remove(self)
        for thing in (self.postfix, self.milter, self.sink, self.dns, self.redis):
            if thing is None:
                continue
            try:
                thing.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                log(f"{self.key}: stopping {type(thing).__name__} failed: {e}")


LIVE: list["System"] = []  # every started system, for the CPU accounting


def _open_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    return path


def _chmod_socket(spec: str) -> None:
    if spec.startswith("unix:"):
        os.chmod(spec[5:], 0o666)  # Postfix's smtpd runs as user postfix


def milter_socket(workdir: Path, kind: str) -> str:
    if kind == "unix":
        return f"unix:{workdir / 'milter.sock'}"
    from support import free_port
    return f"inet:{free_port()}@127.0.0.1"


def start_system(key: str, root: Path, socket_kind: str, *, mg_workers: int, rspamd_procs: int,
                 dns_domains: tuple[str, ...] = (), mg_sets: dict | None = None,
                 variant: dict | None = None, message: Path | None = None, sender: str = "",
                 train: dict | None = None, min_learns: int = 200) -> System:
    workdir = _open_dir(root / key)
    sink = SinkCounter(workdir / "sink").start()
    system = System(key, CONFIG_NAMES[key], workdir, sink)
    LIVE.append(system)
    try:
        if key == "b":
            system.socket = milter_socket(workdir, socket_kind)
            system.milter = NoopMilterProcess(workdir / "noop", socket=system.socket, verbose=False)
            system.milter.start()
            _chmod_socket(system.socket)
        elif key in FULL:
            start_full(system, socket_kind, mg_workers=mg_workers, rspamd_procs=rspamd_procs,
                       mg_sets=mg_sets, message=message, sender=sender, train=train, min_learns=min_learns)
        elif key in MILTERGUARD:
            system.socket = milter_socket(workdir, socket_kind)
            # DNS answered locally: an nsd authoritative for the sender's domain (no DMARC
            # or SPF record there; and from the loopback client SPF and DMARC are not asked,
            # see the full configuration f); nothing is asked beyond loopback.
            from support.dns import NsdServer, Zone

            zones = [Zone(d.rstrip(".") + ".") for d in dict.fromkeys(dns_domains)] or [Zone("bench.invalid.")]
            system.dns = NsdServer(workdir / "nsd", zones).start()
            variant = variant or {}
            system.milter = MilterguardProcess(
                workdir / "mg", socket=system.socket,
                workers=variant.get("workers", mg_workers) if key == "e" else mg_workers,
                sets={"actions.mode": "tag-only", "milter.unix_socket_mode": "0666",
                      "dns.nameservers": [system.dns.address], **(mg_sets or {}),
                      **(variant.get("sets", {}) if key == "e" else {})})
            system.milter.start()
            _chmod_socket(system.socket)
        elif key == "d":
            if not os.path.exists(RSPAMD):
                raise SupportError("rspamd is not installed (apt-get install -y rspamd)")
            system.socket = milter_socket(workdir, socket_kind)
            system.milter = RspamdInstance(workdir / "rspamd", milter_socket=system.socket,
                                           proxy_count=rspamd_procs, hs_cache=HS_CACHE)
            log(f"d: starting rspamd (log: {system.milter.log_file})")
            system.milter.start()
        system.postfix = PostfixInstance(
            workdir / "postfix",
            milter=system.milter.postfix_socket if system.milter is not None else None,
            relay_port=sink.port, extra_main_cf=POSTFIX_BENCH_CF,
            milter_default_action=POSTFIX_BENCH_CF["milter_default_action"])
        system.postfix.start()
    except Exception:
        system.stop()
        raise
    return system


def start_full(system: System, socket_kind: str, *, mg_workers: int, rspamd_procs: int, mg_sets: dict | None,
               message: Path, sender: str, train: dict, min_learns: int) -> None:
    """f or g: nsd with the sender's records, a Redis, the filter learned from TRAIN, then started."""
    from support.redis import RedisServer

    workdir = system.workdir
    system.message = workdir / "signed.eml"
    system.dns = full.start_auth_dns(workdir / "nsd", message, sender, system.message)
    system.redis = RedisServer.start(_open_dir(workdir / "redis"))
    system.socket = milter_socket(workdir, socket_kind)
    if system.key == "f":
        system.milter = MilterguardProcess(
            workdir / "mg", socket=system.socket, workers=mg_workers,
            sets={"actions.mode": "tag-only", "milter.unix_socket_mode": "0666",
                  "dns.nameservers": [system.dns.address], "redis.url": system.redis.url,
                  # The client is 127.0.0.1: judge it as a remote one (SPF, DMARC), as Rspamd's
                  # check_local does in g.
                  "auth.skip_authenticated": "false", "bayes.min_learns": min_learns, **(mg_sets or {})})
        system.learning = full.learn_milterguard(system.milter, train)
        system.milter.start()
        _chmod_socket(system.socket)
    else:
        if not os.path.exists(RSPAMD):
            raise SupportError("rspamd is not installed (apt-get install -y rspamd)")
        system.milter = RspamdInstance(workdir / "rspamd", milter_socket=system.socket, proxy_count=rspamd_procs,
                                       hs_cache=HS_CACHE, nameserver=system.dns.address,
                                       bayes_redis=system.redis.address, min_learns=min_learns)
        log(f"g: starting rspamd (log: {system.milter.log_file})")
        system.milter.start()
        system.learning = full.learn_rspamd(system.milter, system.redis.client(), train)


def last_symbols(system: System) -> list[str]:
    """The symbols of the last message the filter of *system* logged."""
    text = system.milter.log_text() if isinstance(system.milter, RspamdInstance) else \
        system.milter_log().read_text(errors="replace")
    if system.key in RSPAMD_KEYS:
        scans = full.rspamd_symbols(text)
        return scans[-1] if scans else []
    verdicts = parse_verdicts(text)
    return verdicts[-1].symbols if verdicts else []


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------

def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def group_cpu(pids: list[int]) -> float:
    """CPU seconds of *pids*, each with the children it has reaped."""
    return sum(cpu_seconds(p) for p in pids)


def own_cpu() -> float:
    """CPU seconds of everything the benchmark runs: itself and what it waited for
    (smtp-source, postqueue), every Postfix, milter and smtp-sink it started."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for system in LIVE:
        total += group_cpu(system.postfix_pids()) + group_cpu(system.milter_pids()) + group_cpu(system.aux_pids())
        if system.sink.proc is not None:
            total += cpu_seconds(system.sink.proc.pid)
    return total


def count_in_file(path: Path | None, needle: bytes, offset: int = 0) -> tuple[int, int]:
    """Occurrences of *needle* in *path* from *offset*; returns (count, new offset)."""
    if path is None:
        return 0, offset
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return 0, offset
    return data.count(needle), offset + len(data)


def scanned_count(system: System) -> int | None:
    """How many messages the milter says it scanned (None: no such log)."""
    if system.key in MILTERGUARD:
        return count_in_file(system.milter_log(), b" verdict {")[0]
    if system.key in RSPAMD_KEYS:
        return system.milter.task_count()
    return None


def own_times(system: System, offset: int) -> list[float]:
    """The filter's own time per message (ms) logged after *offset* of its log.

    milterguard: ``elapsed_ms`` of each ``verdict {json}`` line (MAIL FROM to
    end of message, as the adapter measures it).  Rspamd: ``time: N ms`` of
    each task line (the scan of the whole message).
    """
    path = system.milter_log()
    if path is None or system.key not in FILTERS:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    if system.key in MILTERGUARD:
        return [float(v["elapsed_ms"]) for v in parse_verdicts(text)
                if isinstance(v.get("elapsed_ms"), (int, float))]
    return [float(v) * (1000.0 if unit == "s" else 1.0)
            for v, unit in re.findall(r"time: ([\d.]+)(ms|s), dns req", text)]


def log_size(system: System) -> int:
    path = system.milter_log()
    try:
        return path.stat().st_size if path else 0
    except FileNotFoundError:
        return 0


def wait_queue_empty(system: System, timeout: float = 30.0) -> bool:
    try:
        wait_until(lambda: not system.postfix.queue(), timeout, interval=0.2,
                   what=f"{system.key}: postfix queue empty")
        return True
    except SupportError:
        return False


def send_round(system: System, message: Path, sender: str, *, messages: int, concurrency: int,
               timeout: float, sample_memory: bool = True) -> dict:
    """One bounded round through *system*; returns its measurements."""
    queue_ok = wait_queue_empty(system)
    base = system.sink.messages
    scanned_before = scanned_count(system)
    log_offset = log_size(system)
    pids_before = system.milter_pids()
    cpu_before = sum(cpu_seconds(p) for p in pids_before)
    pf_before = system.postfix_pids()
    pf_cpu_before = group_cpu(pf_before)
    aux_before = system.aux_pids()
    aux_cpu_before = group_cpu(aux_before)
    own_before = own_cpu()
    sampler = MemSampler(system.milter_pids, interval=0.25, max_seconds=timeout + 30) \
        if sample_memory and system.milter is not None else None
    if sampler:
        sampler.start()
    busy0, total0 = cpu_times()
    src = run_smtp_source(system.postfix.smtpd_port, system.message or message, messages=messages,
                          sessions=concurrency,
                          sender=sender, rcpt=RCPT, timeout=timeout)
    remaining = max(1.0, timeout - (src.finished - src.started))
    reached, counter, last = system.sink.wait_for(base + messages, remaining)
    busy1, total1 = cpu_times()
    own_after = own_cpu()
    pf_after = system.postfix_pids()
    # Postfix children that exited were reaped by the master, whose cutime has them.
    pf_cpu_after = group_cpu(pf_after)
    aux_cpu_after = group_cpu([p for p in aux_before if p in system.aux_pids()])
    if sampler:
        sampler.stop()
    pids_after = system.milter_pids()
    # Only processes alive at both ends count, so that a restarted worker is visible
    # as a change of pids rather than a negative CPU time.
    cpu_after = sum(cpu_seconds(p) for p in pids_before if p in pids_after)
    delivered = counter - base
    seconds = (last - src.started) if delivered else None
    scanned_after = scanned_count(system)
    rec = {
        "config": system.key,
        "concurrency": concurrency,
        "messages": messages,
        "delivered": delivered,
        "complete": reached,
        "seconds": round(seconds, 4) if seconds else None,
        "rate": round(delivered / seconds, 1) if seconds and reached else None,
        "source_seconds": round(src.finished - src.started, 4),
        "source_rc": src.returncode,
        "source_timed_out": src.timed_out,
        "cpu_busy_percent": round(100.0 * (busy1 - busy0) / max(1, total1 - total0), 1),
        "milter_cpu_ms_per_msg": round(1000.0 * (cpu_after - cpu_before) / messages, 3) if pids_before else None,
        "postfix_cpu_ms_per_msg": round(1000.0 * (pf_cpu_after - pf_cpu_before) / messages, 3),
        # the filter's nsd and Redis (the Lua scripts of Bayes run there)
        "aux_cpu_ms_per_msg": round(1000.0 * (aux_cpu_after - aux_cpu_before) / messages, 3) if aux_before else None,
        # CPU not charged to any process the benchmark started: kernel threads (I/O, softirq)
        # and other users of the machine (approximate: clock ticks),
        # in percent of one core over the round.
        "unattributed_cpu_percent": round(100.0 * max(0.0, (busy1 - busy0) / CLK_TCK - (own_after - own_before))
                                     / max(1e-6, time.monotonic() - src.started), 1),
        "queue_was_empty": queue_ok,
    }
    if scanned_before is not None and scanned_after is not None:
        rec["scanned"] = scanned_after - scanned_before
    own = own_times(system, log_offset)
    if own:
        rec["own_p50_ms"] = _r(percentile(own, 50))
        rec["own_p99_ms"] = _r(percentile(own, 99))
        rec["own_max_ms"] = _r(max(own))
    if sampler:
        rec["max_rss_kib"] = sampler.max_rss_kib
        rec["max_pss_kib"] = sampler.max_pss_kib
        rec["procs"] = sampler.max_procs
        rec["pids_changed"] = sorted(pids_before) != sorted(pids_after)
    if src.stderr.strip():
        rec["source_stderr"] = src.stderr.strip()[-500:]
    return rec


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    # Nearest rank, so that p99 of 200 samples is the 198th value.
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def latency_phase(system: System, data: bytes, sender: str, count: int) -> dict:
    """Messages one at a time: the SMTP client's view and the filter's own view."""
    wait_queue_empty(system)
    log_path = system.milter_log()
    offset = log_path.stat().st_size if log_path and log_path.exists() else 0
    if system.message is not None:
        data = system.message.read_bytes().replace(b"\n", b"\r\n")
    res = latency_probe(system.postfix, data, count=count, sender=sender, rcpt=RCPT,
                        deadline_s=max(30.0, count * 0.5))
    t = res.times_ms
    out = {
        "sent": res.sent, "ok": res.ok, "codes": res.codes,
        "p50_ms": _r(percentile(t, 50)), "p90_ms": _r(percentile(t, 90)),
        "p99_ms": _r(percentile(t, 99)), "max_ms": _r(max(t) if t else None),
        "mean_ms": _r(statistics.fmean(t) if t else None),
    }
    own: list[float] = []
    if system.key in FILTERS:
        time.sleep(0.3)  # the verdict is logged right after the reply
        own = own_times(system, offset)
        out["own_source"] = ("milterguard verdict elapsed_ms (MAIL FROM to end of message)" if system.key in MILTERGUARD
                             else "rspamd task log 'time: ...ms' (scan of the whole message)")
    if own:
        out["own_n"] = len(own)
        out["own_p50_ms"] = _r(percentile(own, 50))
        out["own_p99_ms"] = _r(percentile(own, 99))
        out["own_max_ms"] = _r(max(own))
    return out


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def profile_phase(system: System, message: Path, sender: str, seconds: int, rate_hint: float | None,
                  out_dir: Path) -> dict:
    """py-spy on every milterguard worker for *seconds* at concurrency 8."""
    if not pyspy.py_spy():
        return {"error": "py-spy not installed (pip install py-spy)"}
    wait_queue_empty(system)
    workers = [p for p in system.milter_pids() if p != system.milter.proc.pid]
    if not workers:
        return {"error": "no worker processes found"}
    count = int(min(20000, max(500, (rate_hint or 100) * (seconds + 8))))
    base = system.sink.messages
    result: dict = {}

    def load() -> None:
        result["source"] = run_smtp_source(system.postfix.smtpd_port, system.message or message, messages=count,
                                           sessions=8,
                                           sender=sender, rcpt=RCPT, timeout=seconds * 4 + 60)

    t = threading.Thread(target=load, name="profile-load", daemon=True)
    t.start()
    time.sleep(2.0)  # let the load settle
    files, procs = [], []
    for pid in workers:
        f = out_dir / f"pyspy-{pid}.txt"
        files.append(f)
        procs.append(pyspy.start_record(pid, f, seconds))
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate(timeout=10)
        if p.returncode != 0:
            errors.append((err or b"").decode("utf-8", "replace")[-500:])
    t.join(seconds * 4 + 70)
    system.sink.wait_for(base + count, 120)
    summary = pyspy.summarise(files, seconds=seconds)
    summary.update({"workers": workers, "seconds": seconds, "messages": count, "concurrency": 8,
                    "raw_files": [str(f) for f in files]})
    if errors:
        summary["py_spy_errors"] = errors
    return summary


# ---------------------------------------------------------------------------
# environment facts
# ---------------------------------------------------------------------------

def _cmd(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (p.stdout or p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"


def environment() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        import Milter
        pymilter = getattr(Milter, "__version__", "?")
    except ImportError:
        pymilter = "not installed"
    try:
        import milterguard
        mg = getattr(milterguard, "__version__", "?")
    except ImportError:
        mg = "?"
    import hashlib
    tree = hashlib.sha256()
    for path in sorted([*(REPO / "milterguard").rglob("*.py"), *(REPO / "rules").rglob("*.yaml"),
                        *(REPO / "conf").rglob("*.yaml")]):
        try:
            tree.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
        except OSError:
            pass
    git = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if not re.fullmatch(r"[0-9a-f]{5,40}", git):
        git = "no commit yet (work tree)"
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem_kib / 1048576, 1),
                    "kernel": platform.release(), "os": _cmd(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"])},
        "versions": {
            "python": platform.python_version(),
            "pymilter": pymilter,
            "milterguard": mg,
            "milterguard_git": git + (" (modified)" if dirty.strip() else ""),
            # The code under test changes while people work: this names the exact sources.
            "milterguard_sources_sha256": tree.hexdigest()[:16],
            "postfix": _cmd(["postconf", "-d", "-h", "mail_version"]),
            "rspamd": _cmd([RSPAMD, "--version"]).splitlines()[0] if os.path.exists(RSPAMD) else "not installed",
            "libmilter": _cmd(["sh", "-c", "dpkg-query -W -f '${Version}' libmilter1.0.1"]),
        },
    }


def prepare_message(src: Path, dest: Path) -> dict:
    """Copy *src* without its mbox ``From `` line; return facts about it."""
    raw = src.read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    raw = raw.replace(b"\r\n", b"\n")
    dest.write_bytes(raw)
    os.chmod(dest, 0o644)
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    addrs = [a for _, a in email.utils.getaddresses(headers.get_all("From", [])) if a]
    return {
        "file": str(src.relative_to(CORPUS)) if src.is_relative_to(CORPUS) else str(src),
        "bytes": len(raw),
        "bytes_on_wire": len(raw.replace(b"\n", b"\r\n")),
        "subject": str(headers.get("Subject", "")).strip(),
        "sender": addrs[0] if addrs else "sender@example.com",
    }


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def summarise(rounds: list[dict], configs: list[str], concurrency: list[int]) -> dict:
    out: dict = {}
    for key in configs:
        out[key] = {}
        for c in concurrency:
            rates = [r["rate"] for r in rounds if r["config"] == key and r["concurrency"] == c and r.get("rate")]
            incomplete = sum(1 for r in rounds if r["config"] == key and r["concurrency"] == c and not r["complete"])
            cpu = [r["milter_cpu_ms_per_msg"] for r in rounds
                   if r["config"] == key and r["concurrency"] == c and r.get("milter_cpu_ms_per_msg") is not None]
            busy = [r["cpu_busy_percent"] for r in rounds if r["config"] == key and r["concurrency"] == c]
            pf = [r["postfix_cpu_ms_per_msg"] for r in rounds if r["config"] == key and r["concurrency"] == c]
            aux = [r["aux_cpu_ms_per_msg"] for r in rounds if r["config"] == key and r["concurrency"] == c
                   and r.get("aux_cpu_ms_per_msg") is not None]
            own99 = [r["own_p99_ms"] for r in rounds if r["config"] == key and r["concurrency"] == c
                     and r.get("own_p99_ms") is not None]
            own50 = [r["own_p50_ms"] for r in rounds if r["config"] == key and r["concurrency"] == c
                     and r.get("own_p50_ms") is not None]
            unattr = [r["unattributed_cpu_percent"] for r in rounds if r["config"] == key and r["concurrency"] == c]
            out[key][str(c)] = {
                "median": _r(statistics.median(rates), 1) if rates else None,
                "min": min(rates) if rates else None,
                "max": max(rates) if rates else None,
                "rounds": len(rates),
                "incomplete": incomplete,
                "milter_cpu_ms_per_msg": _r(statistics.median(cpu), 2) if cpu else None,
                "cpu_busy_percent": _r(statistics.median(busy), 0) if busy else None,
                "postfix_cpu_ms_per_msg": _r(statistics.median(pf), 2) if pf else None,
                "aux_cpu_ms_per_msg": _r(statistics.median(aux), 2) if aux else None,
                "unattributed_cpu_percent_max": max(unattr) if unattr else None,
                "disturbed_rounds": sum(1 for f in unattr if f > DISTURBED),
                "own_p50_ms": _r(statistics.median(own50), 2) if own50 else None,
                "own_p99_ms": _r(statistics.median(own99), 2) if own99 else None,
            }
    base = out.get("a", {})
    for key in configs:
        for c in concurrency:
            cell = out[key][str(c)]
            a = base.get(str(c), {}).get("median")
            cell["ratio_to_a"] = _r(cell["median"] / a, 2) if a and cell["median"] else None
    return out


def markdown(result: dict) -> str:
    conc = result["settings"]["concurrency"]
    configs = result["settings"]["configs"]
    s = result["summary"]
    lines = []
    hdr = "| configuration | " + " | ".join(f"c={c} msg/s (min–max)" for c in conc) + \
          " | " + " | ".join(f"c={c} vs a" for c in conc) + " |"
    lines += [hdr, "|" + "---|" * (1 + 2 * len(conc))]
    for key in configs:
        if key not in s:  # did not start: result["problems"] says why
            lines.append(f"| {key}: {CONFIG_NAMES[key]} | " + " | ".join(["did not start"] * len(conc))
                         + " | " + " | ".join(["–"] * len(conc)) + " |")
            continue
        cells = []
        for c in conc:
            cell = s[key][str(c)]
            if cell["median"] is None:
                cells.append("failed" if cell["incomplete"] else "–")
            else:
                extra = f", {cell['incomplete']} incomplete" if cell["incomplete"] else ""
                cells.append(f"**{cell['median']:.0f}** ({cell['min']:.0f}–{cell['max']:.0f}{extra})")
        ratios = [f"{s[key][str(c)]['ratio_to_a']:.2f}" if s[key][str(c)]["ratio_to_a"] else "–" for c in conc]
        lines.append(f"| {key}: {CONFIG_NAMES[key]} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines.append("")
    lines += ["| configuration | latency p50 / p90 / p99 (ms, SMTP client, c=1) | filter's own p50 / p99 (ms) "
              "| max RSS sum (MiB) | max PSS sum (MiB) | processes | milter CPU ms/msg (" + " / ".join(f"c={c}" for c in conc) + ") |",
              "|---|---|---|---|---|---|---|"]
    for key in configs:
        if key not in s:
            continue
        lat = result["latency"].get(key, {})
        mem = result["memory"].get(key, {})
        lat_s = (f"{lat['p50_ms']:.1f} / {lat['p90_ms']:.1f} / {lat['p99_ms']:.1f}"
                 if lat.get("p50_ms") is not None else "–")
        own = (f"{lat['own_p50_ms']:.1f} / {lat['own_p99_ms']:.1f}" if lat.get("own_p50_ms") is not None else "–")
        rss = f"{mem['max_rss_mib']:.0f}" if mem.get("max_rss_mib") else "–"
        pss = f"{mem['max_pss_mib']:.0f}" if mem.get("max_pss_mib") else "–"
        procs = str(mem.get("procs") or "–")
        cpu = " / ".join(
            f"{s[key][str(c)]['milter_cpu_ms_per_msg']:.2f}" if s[key][str(c)]["milter_cpu_ms_per_msg"] is not None
            else "–" for c in conc)
        lines.append(f"| {key}: {CONFIG_NAMES[key]} | {lat_s} | {own} | {rss} | {pss} | {procs} | {cpu} |")
    filters = [k for k in configs if k in s and k in FILTERS]
    if filters:
        lines += ["", "| configuration | " + " | ".join(f"filter's own p50 / p99 (ms) at c={c}" for c in conc)
                  + " | its nsd + Redis CPU ms/msg (" + " / ".join(f"c={c}" for c in conc) + ") |",
                  "|---|" + "---|" * (len(conc) + 1)]
        for key in filters:
            cells = [f"{s[key][str(c)]['own_p50_ms']:.1f} / {s[key][str(c)]['own_p99_ms']:.1f}"
                     if s[key][str(c)].get("own_p50_ms") is not None else "–" for c in conc]
            aux = " / ".join(f"{s[key][str(c)]['aux_cpu_ms_per_msg']:.2f}"
                             if s[key][str(c)].get("aux_cpu_ms_per_msg") is not None else "–" for c in conc)
            lines.append(f"| {key}: {CONFIG_NAMES[key]} | " + " | ".join(cells) + f" | {aux} |")
    learned = result.get("learning", {})
    if learned:
        lines += ["", "| full configuration | learned spam / ham | Redis RSS after the run (MiB) |", "|---|---|---|"]
        for key in (k for k in configs if k in learned):
            facts = learned[key]
            red = result.get("redis_memory", {}).get(key, {})
            lines.append(f"| {key}: {CONFIG_NAMES[key]} | {facts.get('learned_spam')} / {facts.get('learned_ham')} "
                         f"| {red.get('rss_mib', '–')} |")
    return "\n".join(lines) + "\n"


DOC_BEGIN = "<!-- bench:results:begin -->"
DOC_END = "<!-- bench:results:end -->"


def update_doc(doc: Path, result: dict, json_path: Path) -> None:
    """Replace the generated block of docs/performance.md with this run's tables."""
    env = result["environment"]
    msg = result["message"]
    block = (f"{DOC_BEGIN}\n"
             f"Run of {env['date']} on {env['machine']['cpus']} cores ({env['machine']['cpu_model']}), "
             f"{result['settings']['rounds']} rounds of {result['settings']['messages']} messages per "
             f"configuration and concurrency, milter socket: {result['settings']['socket']}; "
             f"message `{msg['file']}` ({msg['bytes']} bytes). Raw data: `{json_path}` (on the machine that ran it; `bench/results/` is not kept in the repository).\n\n"
             + markdown(result) + f"{DOC_END}")
    text = doc.read_text() if doc.exists() else ""
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        text = head + block + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    doc.write_text(text)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def socket_probe(root: Path, message: Path, sender: str, messages: int, rounds: int) -> dict:
    """The no-op milter at concurrency 1 on a unix and on a TCP socket."""
    out: dict = {}
    systems: dict[str, System] = {}
    try:
        for kind in ("unix", "inet"):
            systems[kind] = start_system("b", root / f"probe-{kind}", kind, mg_workers=2, rspamd_procs=2)
            send_round(systems[kind], message, sender, messages=20, concurrency=1, timeout=60,
                       sample_memory=False)  # warm-up
        for kind in ("unix", "inet"):
            out[kind] = []
        for _ in range(rounds):
            for kind in ("unix", "inet"):
                rec = send_round(systems[kind], message, sender, messages=messages, concurrency=1,
                                 timeout=max(30.0, messages / 5), sample_memory=False)
                out[kind].append(rec["rate"])
    finally:
        for s in systems.values():
            s.stop()
    med = {k: statistics.median([x for x in v if x]) if any(v) else 0 for k, v in out.items()}
    return {"messages": messages, "rates": out, "median": med,
            "chosen": max(med, key=lambda k: med[k])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about one minute: 3 rounds of 200 messages, no profile")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 7; quick 3)")
    ap.add_argument("--messages", type=int, help="messages per round (default 1000; quick 200)")
    ap.add_argument("--concurrency", default="1,8,32", help="smtp-source sessions, comma separated")
    ap.add_argument("--configs", default="a,b,c,d,f,g",
                    help="which of a,b,c,d,f,g (and e); 'today' is c,d and 'full' f,g")
    ap.add_argument("--latency-messages", type=int, help="messages one at a time per config (default 200; quick 50)")
    ap.add_argument("--socket", choices=("auto", "unix", "inet"), default="auto",
                    help="milter socket for b, c, d; auto measures both with the no-op milter first")
    ap.add_argument("--workers", type=int, default=None,
                    help="milterguard --workers (default: its own default, milter.workers=0: one per core)")
    ap.add_argument("--e-set", action="append", default=[], metavar="KEY=VALUE",
                    help="configuration e: milterguard like c plus this setting (repeatable)")
    ap.add_argument("--e-workers", type=int, help="configuration e: this many workers")
    ap.add_argument("--mg-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra milterguard --set for c and f (repeatable), e.g. bayes.cache_slots=0")
    ap.add_argument("--train-limit", type=int, default=0,
                    help="full configuration: learn only the first N spam and N ham of the train split (default all)")
    ap.add_argument("--min-learns", type=int, default=200,
                    help="full configuration: learned messages of each class before Bayes answers, both filters "
                         "(default 200, the default of both)")
    ap.add_argument("--rspamd-procs", type=int, default=2, help="Rspamd proxy (self_scan) processes (default 2)")
    ap.add_argument("--profile", type=int, help="seconds of py-spy on milterguard's workers at c=8 (default 20; quick 0)")
    ap.add_argument("--profile-config", choices=("c", "e", "f"),
                    help="which milterguard to profile (default f when it runs, else c)")
    ap.add_argument("--message", type=Path, default=DEFAULT_MESSAGE, help="the message to send")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results/<date>.json)")
    ap.add_argument("--update-doc", action="store_true", help="rewrite the results block of docs/performance.md")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    ap.add_argument("--max-minutes", type=float, default=30.0, help="stop starting new rounds after this long")
    args = ap.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (3 if quick else 7)
    args.messages = args.messages or (200 if quick else 1000)
    args.latency_messages = args.latency_messages if args.latency_messages is not None else (50 if quick else 200)
    args.profile = args.profile if args.profile is not None else (0 if quick else 20)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.configs = list(dict.fromkeys(k for x in args.configs.split(",") if x.strip()
                                      for k in CONFIG_GROUPS.get(x.strip(), (x.strip(),))))
    bad = [c for c in args.configs if c not in CONFIG_NAMES]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {','.join(CONFIG_NAMES)}, today, full")
    if not 1 <= args.messages <= 20000 or not 1 <= args.rounds <= 50:
        ap.error("--messages must be 1..20000 and --rounds 1..50")
    if any(not 1 <= c <= 128 for c in args.concurrency):
        ap.error("--concurrency values must be 1..128")
    return args


def _terminate(signum, _frame) -> None:
    # Stop cleanly (Postfix, milters and sinks run in their own sessions and
    # would outlive us); a background job started by a shell ignores SIGINT.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    reason = postfix_available()
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.path.exists(tool):
            reason = reason or f"{tool} is missing (Debian package postfix)"
    if reason:
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    stop_after = started + args.max_minutes * 60
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = args.out or (BENCH / "results" / f"{stamp}{'-quick' if args.quick else ''}.json")
    out_path = out_path if out_path.is_absolute() else (Path.cwd() / out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mgbench-", dir="/tmp"))
    os.chmod(root, 0o755)
    log(f"work directory {root}")
    message = root / "message.eml"
    msg_info = prepare_message(args.message, message)
    data = message.read_bytes().replace(b"\n", b"\r\n")
    sender = msg_info["sender"]
    mg_sets = {}
    for item in args.mg_set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"bench: --mg-set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        mg_sets[key.strip()] = value
    variant: dict = {"sets": dict(item.partition("=")[::2] for item in args.e_set)}
    if args.e_workers is not None:
        variant["workers"] = args.e_workers
    result: dict = {
        "environment": environment(),
        "message": msg_info,
        "settings": {"rounds": args.rounds, "messages": args.messages, "concurrency": args.concurrency,
                     "configs": args.configs, "latency_messages": args.latency_messages,
                     "milterguard_workers": args.workers, "rspamd_proxy_processes": args.rspamd_procs,
                     "quick": args.quick, "postfix_main_cf": POSTFIX_BENCH_CF,
                     "train_limit": args.train_limit, "min_learns": args.min_learns,
                     "milterguard_sets": {"actions.mode": "tag-only", "milter.unix_socket_mode": "0666",
                                          **mg_sets},
                     "variant_e": variant},
        "problems": [],
    }
    systems: dict[str, System] = {}
    try:
        # 1. Which socket type: the no-op milter at concurrency 1, unix against TCP.
        kind = args.socket
        if kind == "auto":
            n = 60 if args.quick else 200
            log(f"socket probe: no-op milter, {n} messages at c=1 on unix and on TCP")
            probe = socket_probe(root, message, sender, n, 1 if args.quick else 2)
            result["socket_probe"] = probe
            kind = probe["chosen"]
            log(f"socket probe: {probe['median']} msg/s -> {kind}")
        result["settings"]["socket"] = kind

        # 2. Start every configuration.
        train = full.train_files(exclude=args.message, limit=args.train_limit) \
            if any(k in FULL for k in args.configs) else {}
        for key in args.configs:
            try:
                log(f"{key}: starting {CONFIG_NAMES[key]}")
                systems[key] = start_system(key, root, kind, mg_workers=args.workers,
                                            rspamd_procs=args.rspamd_procs,
                                            dns_domains=(sender.rpartition("@")[2],), mg_sets=mg_sets,
                                            variant=variant, message=message, sender=sender, train=train,
                                            min_learns=args.min_learns)
                if systems[key].learning:
                    result.setdefault("learning", {})[key] = systems[key].learning
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                msg = f"{key} ({CONFIG_NAMES[key]}) did not start: {e}"
                log(msg)
                result["problems"].append(msg)

        # 3. Warm-up: every process spawned, caches filled; a system that cannot
        #    deliver its warm-up is dropped with the reason.
        for key, system in list(systems.items()):
            rec = send_round(system, message, sender, messages=40, concurrency=8, timeout=60,
                             sample_memory=False)
            if not rec["complete"]:
                msg = (f"{key}: warm-up delivered {rec['delivered']} of 40; dropped. "
                       f"milter log tail:\n{_milter_tail(system)}\npostfix log tail:\n{system.postfix.log_tail(15)}")
                log(msg)
                result["problems"].append(msg)
                system.stop()
                del systems[key]
            elif key in FILTERS and rec.get("scanned") != 40:
                result["problems"].append(f"{key}: warm-up: 40 delivered but {rec.get('scanned')} scans logged")
            if key in FULL and key in systems:
                check_full(system, result)
        result["memory_idle"] = {}
        for key, system in systems.items():
            if system.milter is not None:
                s = sample(system.milter_pids())
                result["memory_idle"][key] = {"rss_mib": _r(s.rss_kib / 1024, 1), "pss_mib": _r(s.pss_kib / 1024, 1),
                                              "procs": s.nprocs}

        # 4. Interleaved rounds.
        rounds: list[dict] = []
        live = [k for k in args.configs if k in systems]
        for rnd in range(args.rounds):
            if time.monotonic() > stop_after:
                result["problems"].append(f"time limit: stopped before round {rnd + 1}")
                break
            for c in args.concurrency:
                for key in live:
                    system = systems.get(key)
                    if system is None or system.error:
                        continue
                    timeout = max(60.0, args.messages / 4)
                    rec = send_round(system, message, sender, messages=args.messages, concurrency=c,
                                     timeout=timeout)
                    rec["round"] = rnd + 1
                    rounds.append(rec)
                    scanned = f" scanned={rec['scanned']}" if "scanned" in rec else ""
                    log(f"round {rnd + 1} c={c:<2} {key}: {rec['delivered']}/{rec['messages']} in "
                        f"{rec['seconds']}s -> {rec['rate']} msg/s, cpu {rec['cpu_busy_percent']}% "
                        f"(unattributed {rec['unattributed_cpu_percent']}% of a core){scanned}")
                    _check_round(system, rec, result)
        result["rounds"] = rounds
        result["summary"] = summarise(rounds, live, args.concurrency)

        # 5. Memory: maximum over all rounds.
        result["memory"] = {}
        for key in live:
            recs = [r for r in rounds if r["config"] == key and "max_rss_kib" in r]
            if recs:
                result["memory"][key] = {
                    "max_rss_mib": _r(max(r["max_rss_kib"] for r in recs) / 1024, 1),
                    "max_pss_mib": _r(max(r["max_pss_kib"] for r in recs) / 1024, 1),
                    "procs": max(r["procs"] for r in recs),
                }

        # 6. Latency, one message at a time, interleaved over the configurations.
        result["latency"] = {}
        if args.latency_messages:
            for key in live:
                if key in systems:
                    log(f"latency: {key}, {args.latency_messages} messages one at a time")
                    result["latency"][key] = latency_phase(systems[key], data, sender, args.latency_messages)

        # 7. Profile milterguard's workers under load.
        target = args.profile_config or ("f" if "f" in systems else "c")
        if args.profile and target in systems and time.monotonic() < stop_after:
            rate = result["summary"].get(target, {}).get("8", {}).get("median")
            log(f"profile: py-spy on milterguard's workers ({target}) for {args.profile}s at c=8")
            prof = profile_phase(systems[target], message, sender, args.profile, rate, root)
            prof["config"] = target
            result["profile"] = prof
            prof_txt = out_path.with_suffix(".profile.txt")
            prof_txt.write_text(_profile_text(prof))
            log(f"profile written to {prof_txt}")

        # 7b. milterguard's own time per check in the full configuration.
        if "f" in systems and time.monotonic() < stop_after:
            log("f: time per check, milterguard scan --json of the message 40 times")
            timings = full.check_timings(systems["f"].milter, systems["f"].message, sender, RCPT)
            result["check_timings"] = {"f": timings}
            log(f"f: scan median {timings.get('elapsed_median_ms')} ms; top checks "
                + ", ".join(f"{r['check']} {r['median_ms']}" for r in timings.get("checks", [])[:6]))

        # 8. Final checks: errors in the milters' logs; the full configurations still did the work
        #    and talked to nothing beyond loopback; their Redis's memory.
        for key, system in systems.items():
            result.setdefault("log_checks", {})[key] = _log_checks(system)
            if key in FULL:
                check_full(system, result)
                s = sample([system.redis.proc.pid])
                result.setdefault("redis_memory", {})[key] = {"rss_mib": _r(s.rss_kib / 1024, 1),
                                                              "pss_mib": _r(s.pss_kib / 1024, 1)}
    except KeyboardInterrupt as e:
        result["problems"].append(f"interrupted {e}".strip())
    except Exception:  # noqa: BLE001 - still write what we have
        tb = traceback.format_exc()
        log(tb)
        result["problems"].append("bench crashed:\n" + tb)
    finally:
        for system in systems.values():
            system.stop()
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        log(f"results written to {out_path}")
        if "summary" in result:
            print()
            print(markdown(result))
            if args.update_doc:
                doc = REPO / "docs" / "performance.md"
                try:
                    rel = out_path.relative_to(REPO)
                except ValueError:
                    rel = out_path
                update_doc(doc, result, rel)
                log(f"updated {doc}")
        for p in result["problems"]:
            print("PROBLEM:", p.splitlines()[0] if p else p)
        if args.keep:
            log(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if not result["problems"] else 1


def check_full(system: System, result: dict) -> None:
    """The last scan of a full configuration shows SPF, DKIM, DMARC, ARC and Bayes at work;
    none of its filter's sockets (nor its Redis's) leads beyond loopback."""
    symbols = last_symbols(system)
    missing = full.check_auth(symbols)
    foreign = full.foreign_peers(system.milter_pids() + [system.redis.proc.pid])
    checks = result.setdefault("full_checks", {}).setdefault(system.key, [])
    checks.append({"symbols": symbols, "missing": missing, "foreign_sockets": foreign})
    if missing:
        result["problems"].append(f"{system.key}: the last scan lacks {missing} (symbols: {symbols})")
    if foreign:
        result["problems"].append(f"{system.key}: sockets beyond loopback: {foreign}")


def _milter_tail(system: System, n: int = 15) -> str:
    m = system.milter
    if m is None:
        return "(no milter)"
    if isinstance(m, RspamdInstance):
        return m.log_tail(n)
    return m.log_tail(n)


def _check_round(system: System, rec: dict, result: dict) -> None:
    if not rec["complete"]:
        system.failures += 1
        msg = (f"{system.key} c={rec['concurrency']} round {rec.get('round')}: only {rec['delivered']} of "
               f"{rec['messages']} delivered in time; milter log tail:\n{_milter_tail(system, 8)}")
        result["problems"].append(msg)
        if system.failures >= 2:
            system.error = "two incomplete rounds"
            result["problems"].append(f"{system.key}: dropped after two incomplete rounds")
    if "scanned" in rec and rec["scanned"] != rec["messages"]:
        result["problems"].append(f"{system.key} c={rec['concurrency']} round {rec.get('round')}: "
                                  f"{rec['scanned']} scans logged for {rec['messages']} messages")
    if rec.get("pids_changed"):
        result["problems"].append(f"{system.key} c={rec['concurrency']} round {rec.get('round')}: "
                                  "milter processes changed during the round (a worker died?)")


def _log_checks(system: System) -> dict:
    out: dict = {}
    path = system.milter_log()
    if path and path.exists():
        text = path.read_text(errors="replace")
        bad = [ln for ln in text.splitlines()
               if re.search(r"\b(ERROR|CRITICAL|Traceback|internal error|died)\b", ln)
               and "abnormally closing milter connection" not in ln]
        out["milter_error_lines"] = len(bad)
        out["milter_error_sample"] = bad[:5]
    pf_warn = [ln for ln in system.postfix.log_lines() if "warning:" in ln or "fatal:" in ln]
    out["postfix_warnings"] = len(pf_warn)
    out["postfix_warning_sample"] = pf_warn[:5]
    return out


def _profile_text(prof: dict) -> str:
    if "error" in prof:
        return f"profile failed: {prof['error']}\n"
    lines = [f"py-spy record --gil on milterguard workers {prof['workers']} for {prof['seconds']} s at concurrency "
             f"{prof['concurrency']} ({prof['samples']} samples of the thread holding the GIL, 100 Hz)",
             f"share of the time each worker held the GIL: {prof.get('gil_held_percent')}",
             "", "top functions by own samples:"]
    for r in prof["self"]:
        lines.append(f"  {r['percent']:5.1f}%  {r['function']}")
    lines += ["", "top functions by inclusive samples:"]
    for r in prof["inclusive"]:
        lines.append(f"  {r['percent']:5.1f}%  {r['function']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
