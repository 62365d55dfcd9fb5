#!/usr/bin/env python3
"""What the metrics cost the mail path: corpus mail through Postfix, with and without them.

    python bench/metrics.py [--messages 400] [--rounds 3] [--concurrency 4] [--workers 2]
                            [--scrape-every 0.1] [--update-doc]

Two private Postfix instances on loopback each hand their sessions to a
`milterguard serve` of their own (--workers each) and relay what they accept
to Postfix's smtp-sink, which keeps nothing: one filter with the metrics
off, the other with `metrics.listen` set.  Three kinds of run:

- off:         the filter without metrics;
- on:          the filter with metrics, nobody scraping;
- on+scrape:   the same, with a scraper asking GET /metrics every --scrape-every seconds
               (the default, 0.1 s, is 150 times Prometheus's usual 15 s).

Each run sends --messages corpus messages (ham and spam of both parts, the
same ones in the same order each time, each with a fresh Message-ID), one
SMTP session per message, --concurrency sessions at once.  The kinds run in
turns, their order rotated each round, --rounds times, so that whatever else
the machine does falls on all of them alike.  The table gives, per kind, the
messages per second (all rounds), the median and 99th percentile of the
time from connecting to the reply to the end of DATA (which waits for the
filter's verdict), the workers' CPU time per message and the supervisor's
per run (from /proc), and how many scrapes were answered and how long they
took.

Needs root (Postfix) and postfix; everything listens on 127.0.0.1 only and
every loop is bounded.  --update-doc writes the table into docs/metrics.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import smtplib
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from faults import corpus_messages  # noqa: E402  (also puts tests/ on sys.path)
from soak import PostfixSink, envelope_sender  # noqa: E402
from support import LOOPBACK, SupportError, free_port  # noqa: E402
from support.mailgen import strip_message_id  # noqa: E402
from support.milterguard_proc import MilterguardProcess  # noqa: E402
from support.postfix import PostfixInstance, postfix_available  # noqa: E402

DOC = REPO / "docs" / "metrics.md"
BEGIN, END = "<!-- metrics table: bench/metrics.py --update-doc -->", "<!-- end of metrics table -->"
RCPT = "user@example.net"
KINDS = ("off", "on", "on+scrape")
WARM = 20  # messages sent to each filter before the runs


class Pair:
    """A filter and the Postfix that uses it."""

    def __init__(self, work: Path, name: str, sink_port: int, workers: int, metrics_port: int | None) -> None:
        sets = {"quarantine.mode": "mta-hold"}
        if metrics_port is not None:
            sets["metrics.listen"] = f"{LOOPBACK}:{metrics_port}"
        self.mg = MilterguardProcess(work / f"milterguard-{name}", workers=workers, sets=sets).start()
        self.pf = PostfixInstance(work / f"postfix-{name}", milter=self.mg.socket, relay_port=sink_port).start()

    def close(self) -> None:
        for stop in (self.pf.stop, self.mg.stop):
            try:
                stop()
            except (SupportError, OSError) as exc:
                print(f"cleanup: {exc}", file=sys.stderr)


def send_one(port: int, sender: str, raw: bytes) -> float:
    """One SMTP session; seconds from connecting to the reply to the end of DATA."""
    t0 = time.perf_counter()
    with smtplib.SMTP(LOOPBACK, port, timeout=120) as smtp:
        smtp.ehlo("bench.example.org")
        smtp.mail(sender)
        smtp.rcpt(RCPT)
        try:
            smtp.data(raw)
        except smtplib.SMTPDataError:
            pass  # a reject is an answer too
        return time.perf_counter() - t0


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def filter_cpu(pair: Pair) -> tuple[float, float]:
    """(supervisor, workers) CPU seconds of the filter so far."""
    return cpu_seconds(pair.mg.pid), sum(cpu_seconds(pid) for pid in pair.mg.worker_pids())


def one_run(pair: Pair, messages: list[tuple[str, bytes]], concurrency: int,
            run_id: str) -> tuple[list[float], float]:
    port = pair.pf.smtpd_port

    def job(item: tuple[int, tuple[str, bytes]]) -> float:
        number, (sender, raw) = item
        head = f"Message-ID: <bench.{number}.{run_id}@bench.example.org>\r\n".encode()
        return send_one(port, sender, head + raw)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(job, enumerate(messages)))
    return latencies, time.perf_counter() - t0


class Scraper:
    """GET /metrics every EVERY seconds until stopped."""

    def __init__(self, port: int, every: float) -> None:
        self.url, self.every = f"http://{LOOPBACK}:{port}/metrics", every
        self.stop = threading.Event()
        self.answered = self.failed = 0
        self.seconds: list[float] = []
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.wait(self.every):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                self.answered += 1
                self.seconds.append(time.perf_counter() - t0)
            except OSError:
                self.failed += 1

    def __enter__(self) -> "Scraper":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400, help="messages per run (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="SMTP sessions at once (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="workers of each filter (default 2)")
    parser.add_argument("--scrape-every", type=float, default=0.1, help="seconds between scrapes (default 0.1)")
    parser.add_argument("--update-doc", action="store_true", help="write the table into docs/metrics.md")
    args = parser.parse_args(argv)
    reason = postfix_available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    messages = []
    for raw in corpus_messages(args.messages):
        body = strip_message_id(raw)
        messages.append((envelope_sender(raw), body))
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="milterguard-bench-metrics-"))
    sink = PostfixSink().start()
    metrics_port = free_port()
    pairs: dict[str, Pair] = {}
    results = {kind: {"latencies": [], "seconds": 0.0, "messages": 0, "supervisor_cpu": 0.0, "workers_cpu": 0.0}
               for kind in KINDS}
    scrapes = [0, 0]
    scrape_seconds: list[float] = []
    try:
        pairs["off"] = Pair(work, "off", sink.port, args.workers, None)
        pairs["on"] = Pair(work, "on", sink.port, args.workers, metrics_port)
        one_run(pairs["off"], messages[:WARM], args.concurrency, "warm-off")  # first sessions: imports, caches
        one_run(pairs["on"], messages[:WARM], args.concurrency, "warm-on")
        for rnd in range(args.rounds):
            order = KINDS[rnd % 3:] + KINDS[:rnd % 3]
            for kind in order:
                pair = pairs["off" if kind == "off" else "on"]
                run_id = f"{kind}.{rnd}"
                cpu_before = filter_cpu(pair)
                if kind == "on+scrape":
                    with Scraper(metrics_port, args.scrape_every) as scraper:
                        latencies, seconds = one_run(pair, messages, args.concurrency, run_id)
                    scrapes[0] += scraper.answered
                    scrapes[1] += scraper.failed
                    scrape_seconds += scraper.seconds
                else:
                    latencies, seconds = one_run(pair, messages, args.concurrency, run_id)
                time.sleep(1.0)  # the workers' last flush, and their CPU time settled in /proc
                cpu_after = filter_cpu(pair)
                got = results[kind]
                got["supervisor_cpu"] += cpu_after[0] - cpu_before[0]
                got["workers_cpu"] += cpu_after[1] - cpu_before[1]
                got["latencies"] += latencies
                got["seconds"] += seconds
                got["messages"] += len(latencies)
                print(f"round {rnd + 1} {kind:10s} {len(latencies) / seconds:7.1f} msg/s, "
                      f"p50 {1000 * percentile(latencies, 0.5):6.1f} ms, "
                      f"p99 {1000 * percentile(latencies, 0.99):6.1f} ms", flush=True)
        time.sleep(1.5)  # the workers write what they counted every 0.5 s
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("milterguard_messages_total{"))
    finally:
        for pair in pairs.values():
            pair.close()
        sink.stop()
    rows = ["| run | messages | messages/s | p50 (ms) | p99 (ms) | workers' CPU per message (ms) "
            "| supervisor's CPU per run (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        got = results[kind]
        rows.append(f"| {kind} | {got['messages']} | {got['messages'] / got['seconds']:.1f} | "
                    f"{1000 * percentile(got['latencies'], 0.5):.1f} | "
                    f"{1000 * percentile(got['latencies'], 0.99):.1f} | "
                    f"{1000 * got['workers_cpu'] / got['messages']:.2f} | "
                    f"{got['supervisor_cpu'] / args.rounds:.2f} |")
    expected = results["on"]["messages"] + results["on+scrape"]["messages"] + len(messages[:WARM])
    table = "\n".join(rows) + (
        f"\n\n{args.rounds} rounds of {args.messages} corpus messages per run, {args.concurrency} SMTP sessions "
        f"at once, {args.workers} workers per filter; {scrapes[0]} scrapes answered during the on+scrape runs "
        f"(one {args.scrape_every:g} s after the other ended), {scrapes[1]} failed; a scrape took "
        f"{1000 * percentile(scrape_seconds or [0.0], 0.5):.1f} ms at the median and "
        f"{1000 * percentile(scrape_seconds or [0.0], 0.99):.1f} ms at the 99th percentile. The filter with "
        f"metrics counted {counted:.0f} messages in milterguard_messages_total; it was sent {expected}. "
        f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    print()
    print(table)
    if args.update_doc:
        doc = DOC.read_text()
        if BEGIN not in doc:
            doc = doc.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    return 0 if counted == expected and not scrapes[1] else 1


if __name__ == "__main__":
    sys.exit(main())
