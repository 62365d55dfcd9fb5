"""Measure the engine alone: messages per second, latency and memory.

Runs `scan`'s path (the same engine the milter uses) over a set of messages,
repeatedly, in one process, and prints throughput, p50/p99 latency and the
resident memory.  The checks make no DNS lookups unless --dns is given, as
for `corpus`.  The end-to-end benchmark through Postfix lives in
`bench/` of the source tree.
"""

from __future__ import annotations

import json
import time

from milterguard.cli.common import CliError, add_dns_option, load_engine, load_offline, report
from milterguard.mail.raw import iter_message_files, read_message


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR", help="messages to run")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the messages (default 3)")
    parser.add_argument("--limit", type=int, default=0, help="use at most this many messages")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--metrics", action="store_true",
                        help="run each round twice, recording the metrics of each verdict (as the milter does "
                             "with metrics.listen set) and not, in turns, and report both")
    add_dns_option(parser)


def rss_kib() -> int:
    """Resident set size of this process, in KiB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(args) -> int:
    from milterguard.cli.scan import build

    try:
        engine = load_engine(args, load_offline(args))
    except CliError as exc:
        return report(exc)
    paths = list(iter_message_files(args.paths))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        return report(CliError("no messages"))
    raws = [read_message(p) for p in paths]

    class _Env:
        ip = "198.51.100.20"
        client_name = "mail.example.net"
        helo = "mail.example.net"
        mail_from = None
        rcpt = ["user@example.org"]
        auth = ""

    def one_round(latencies: list[float], record) -> float:
        t_start = time.perf_counter()
        for i, raw in enumerate(raws):
            t0 = time.perf_counter()
            conn, txn = build(_Env, raw, i)
            verdict = engine.evaluate(conn, txn)
            if record is not None:
                record(verdict)
            latencies.append(time.perf_counter() - t0)
        return time.perf_counter() - t_start

    start_rss = rss_kib()
    if not args.metrics:
        latencies: list[float] = []
        total = sum(one_round(latencies, None) for _ in range(max(1, args.rounds)))
        result = _figures(latencies, total) | {"rss_mib_start": round(start_rss / 1024, 1),
                                               "rss_mib_end": round(rss_kib() / 1024, 1)}
    else:
        result = _with_metrics(one_round, max(1, args.rounds))
    if args.json:
        print(json.dumps(result))
    elif args.metrics:
        for name in ("off", "on"):
            r = result[name]
            print(f"metrics {name}: {r['messages']} messages: {r['per_second']}/s, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms, CPU {r['cpu_ms_per_message']} ms per message")
        print(f"recording cost: {result['cost_us_per_message']} us of CPU per message "
              f"({result['cost_percent']}% of the CPU time per message)")
    else:
        print(
            f"{result['messages']} messages in one process: {result['per_second']}/s, "
            f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms, "
            f"RSS {result['rss_mib_start']} -> {result['rss_mib_end']} MiB"
        )
    return 0


def _figures(latencies: list[float], total: float) -> dict:
    latencies = sorted(latencies)
    return {
        "messages": len(latencies),
        "per_second": round(len(latencies) / total, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 3),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "max_ms": round(1000 * latencies[-1], 3),
    }


def _with_metrics(one_round, rounds: int) -> dict:
    """Rounds without and with the metrics, in turns (off, on, on, off, ...), in one process.

    The metrics are prometheus_client's multiprocess files in a temporary directory, as the
    filter's workers write them.  The cost is taken from the process's CPU time (its
    flushing thread included), which other work on the machine disturbs less than the
    time on the clock.
    """
    import shutil
    import tempfile

    from milterguard import metrics

    directory = tempfile.mkdtemp(prefix="milterguard-bench-metrics-")
    runs = {"off": ([], 0.0, 0.0), "on": ([], 0.0, 0.0)}
    try:
        metrics.enable(directory)
        metrics.start_recording()
        for n in range(rounds):
            for name in (("off", "on") if n % 2 == 0 else ("on", "off")):
                latencies, total, cpu = runs[name]
                cpu0 = time.process_time()
                total += one_round(latencies, metrics.record_verdict if name == "on" else None)
                if name == "on":
                    metrics.flush()  # what the flushing thread does, within the round's time
                runs[name] = (latencies, total, cpu + time.process_time() - cpu0)
    finally:
        metrics.disable()
        shutil.rmtree(directory, ignore_errors=True)
    result = {}
    for name, (latencies, total, cpu) in runs.items():
        result[name] = _figures(latencies, total) | {"cpu_ms_per_message": round(1000 * cpu / len(latencies), 3)}
    per_off = runs["off"][2] / len(runs["off"][0])
    per_on = runs["on"][2] / len(runs["on"][0])
    result["cost_us_per_message"] = round(1e6 * (per_on - per_off), 1)
    result["cost_percent"] = round(100 * (per_on - per_off) / per_off, 2)
    return result
