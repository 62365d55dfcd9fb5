#!/usr/bin/env python3
"""The fault campaign: milterguard under load through a real Postfix while things break.

    python bench/faults.py [--messages 200] [--concurrency 8] [--workers 2]
                           [--only redis-down,dns-silent] [--keep] [--update-doc]

One private Postfix on loopback (tests/support/postfix.py) hands every
session to `milterguard serve` and relays what it accepts to an SMTP sink;
Redis, clamd and nsd run beside it, each on a loopback port.  For each
fault in turn, --concurrency threads send --messages corpus mail (from
$MILTERGUARD_CORPUS, else shared/corpus beside the checkout), each marked
with an X-Fault-Campaign header; the fault is injected a tenth of the way
in and, where it has an end, lifted at six tenths.  Then the Postfix queue
is let drain, and the table says for each fault:

  accepted   250 to the end of DATA
  delivered  of those, found at the sink
  held       of those, in Postfix's hold queue (quarantine.mode mta-hold)
  lost       accepted and neither delivered nor held: must be 0
  4xx, 5xx   the other answers (a 4xx keeps the message at the sender)
  log lines  lines of the filter's log during the fault, verdict lines aside
  stop       for the stop under load: SIGTERM to exit, and the answers of the
             sessions open at the SIGTERM

--update-doc writes the table into docs/reliability.md between its markers.
Needs root (Postfix), postfix, redis-server, clamd and nsd.  This is not part
of the test suite; every loop is bounded in count and in time, and everything
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

from support import LOOPBACK, SupportError, corpus_dir  # noqa: E402
from support.clamd import ClamdInstance, clamd_available  # noqa: E402
from support.dns import NsdServer, Zone, nsd_available  # noqa: E402
from support.milterguard_proc import MilterguardProcess  # noqa: E402
from support.postfix import PostfixInstance, postfix_available  # noqa: E402
from support.redis import RedisServer, redis_available  # noqa: E402
from support.sink import SmtpSink  # noqa: E402

DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- faults table: bench/faults.py --update-doc -->", "<!-- end of faults table -->"
MARK = re.compile(rb"X-Fault-Campaign: (\S+)")
SENDER, RCPT = "campaign@example.org", "user@example.net"
INJECT_AT, LIFT_AT = 0.1, 0.6
SETTLE = 6.0  # seconds of slow load after the fault is lifted: a dependency is retried within 4 s
DRAIN_LIMIT = 120.0  # seconds for the Postfix queue to empty after a fault
LARGE_BYTES = 20 * 1024 * 1024
BROKEN_RULES = "- symbol: BROKEN_BY_THE_CAMPAIGN\n  weight: [1\n"


@dataclass
class Sent:
    mark: str
    code: int
    started: float
    ended: float


@dataclass
class Result:
    fault: str
    sent: list[Sent] = field(default_factory=list)  # in its order of sending, the settling messages last
    delivered: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    log_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def accepted(self) -> set[str]:
        return {s.mark for s in self.sent if 200 <= s.code < 300}

    def count(self, low: int) -> int:
        return sum(1 for s in self.sent if low <= s.code < low + 100)

    def lost(self) -> set[str]:
        return self.accepted() - self.delivered - self.held


class Rig:
    """The servers on loopback: an SMTP sink, Redis, clamd, nsd, `milterguard serve` and Postfix.

    PREPARE, if given, runs once Redis is up and before the filter starts
    (bench/soak.py learns and trains there).  WORKERS None is serve's
    default, one per core.
    """

    def __init__(self, work: Path, *, workers: int | None, sink: SmtpSink | None = None,
                 sets: dict | None = None, prepare: Callable[["Rig"], None] | None = None) -> None:
        self.work = work
        self.sink = (sink or SmtpSink()).start()
        self.redis = RedisServer.start(work / "redis")
        self.clamd = ClamdInstance(work / "clamd").start()
        self.nsd = NsdServer(work / "nsd", [Zone("test.invalid")]).start()
        self.mg = MilterguardProcess(work / "milterguard", workers=workers, sets={
            "redis.url": self.redis.url, "clamav.address": self.clamd.address,
            "dns.nameservers": self.nsd.address, "quarantine.mode": "mta-hold", **(sets or {}),
        })
        if prepare is not None:
            prepare(self)
        self.mg.start()
        self.pf = PostfixInstance(work / "postfix", milter=self.mg.socket, relay_port=self.sink.port,
                                  extra_main_cf={"message_size_limit": 2 * LARGE_BYTES,
                                                 "smtpd_recipient_limit": 2000})
        self.pf.start()

    def close(self) -> None:
        for stop in (self.pf.stop, self.mg.stop, self.nsd.stop, self.clamd.stop, self.redis.stop, self.sink.stop):
            try:
                stop()
            except (SupportError, OSError) as exc:
                print(f"cleanup: {exc}", file=sys.stderr)

    def drain(self) -> None:
        """Until everything Postfix holds, the hold queue aside, has gone to the sink."""
        deadline = time.monotonic() + DRAIN_LIMIT
        while time.monotonic() < deadline:
            if not [m for m in self.pf.queue() if m.get("queue_name") != "hold"]:
                return
            self.pf.flush()
            time.sleep(0.5)


class Campaign(Rig):
    """The servers, the load, and one run per fault."""

    def __init__(self, work: Path, args) -> None:
        self.args = args
        self.corpus = corpus_messages(args.messages + int(SETTLE * 2))
        self.silent: socket.socket | None = None
        super().__init__(work, workers=args.workers)

    def close(self) -> None:
        super().close()
        if self.silent is not None:
            self.silent.close()

    # ------------------------------------------------------------ faults

    def faults(self) -> dict[str, tuple[str, Callable | None, Callable | None]]:
        """name -> (what it is, inject, lift)."""
        return {
            "none": ("no fault (the reference)", None, None),
            "redis-down": ("Redis stopped, started again", self.redis.stop, self.redis.restart),
            "clamd-stopped": ("clamd stopped, started again", self.clamd.stop,
                              lambda: self.clamd.start(port=self.clamd.port)),
            "clamd-frozen": ("clamd frozen (SIGSTOP), then SIGCONT", self.clamd.pause, self.clamd.resume),
            "dns-silent": ("the name server never answers, then answers again", self.dns_silent, self.dns_back),
            "worker-killed": ("a worker killed (SIGKILL)", self.kill_worker, None),
            "sighup-broken": ("SIGHUP with a broken rule file, then fixed", self.break_rules, self.fix_rules),
            "sigterm": ("SIGTERM under load, then a new start", self.stop_under_load, None),
            "1000-rcpts": ("one message to 1,000 recipients among the others", None, None),
            "large": ("one 20 MB message among the others", None, None),
        }

    def dns_silent(self) -> None:
        port = self.nsd.port
        self.nsd.stop()
        self.silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.silent.bind((LOOPBACK, port))  # reads nothing: every query goes unanswered

    def dns_back(self) -> None:
        assert self.silent is not None
        self.silent.close()
        self.silent = None
        self.nsd.start(self.nsd.port)

    def kill_worker(self) -> None:
        os.kill(self.mg.worker_pids()[0], signal.SIGKILL)

    def break_rules(self) -> None:
        self.mg.write_rules("broken", BROKEN_RULES)
        self.mg.reload()

    def fix_rules(self) -> None:
        (self.mg.etc_dir / "rules.d" / "broken.yaml").unlink()
        self.mg.reload()

    def stop_under_load(self) -> None:
        sent_at = time.monotonic()
        self.stop_signal = sent_at
        self.mg.signal(signal.SIGTERM)
        try:
            self.mg.proc.wait(30)
        finally:
            self.stop_seconds = time.monotonic() - sent_at
            self.mg.stop()  # reaps what is left, if anything
        self.mg.start()

    # ------------------------------------------------------------ one run

    def run(self, name: str) -> Result:
        what, inject, lift = self.faults()[name]
        result = Result(name)
        self.stop_signal = self.stop_seconds = 0.0
        n = self.args.messages
        specials = {}
        if name == "1000-rcpts":
            specials[int(n * 0.3)] = [f"member{i:04d}@lists.example.net" for i in range(1000)]
        if name == "large":
            specials[int(n * 0.3)] = "large"
        actions = {}
        if inject:
            actions[int(n * INJECT_AT)] = inject
        if lift:
            actions[int(n * LIFT_AT)] = lift
        log_from = len(self.mg.log_text())
        started = time.monotonic()
        result.sent = self.load(name, n, specials, actions)
        result.seconds = time.monotonic() - started
        if lift or name == "sigterm":
            # Two messages a second for a while, so that the line of a dependency that is
            # back (logged at its first use after its retry time) belongs to this fault.
            for k in range(int(SETTLE * 2)):
                result.sent += self.load(f"{name}-settle{k}", 1, {}, {}, offset=n + k)
                time.sleep(0.5)
        self.drain()
        result.log_lines = [line for line in self.mg.log_text()[log_from:].splitlines()
                            if line.strip() and "verdict {" not in line]
        for message in self.sink.messages:
            found = MARK.search(message.data[:65536])
            if found and found.group(1).decode().startswith(name):
                result.delivered.add(found.group(1).decode())
        for qid in self.pf.hold_queue():
            found = MARK.search(self.pf.run("postcat", "-hq", qid).stdout.encode())
            if found and found.group(1).decode().startswith(name):
                result.held.add(found.group(1).decode())
        self.pf.delete("ALL")
        self.sink.clear()
        if name == "sigterm":
            opened = [s for s in result.sent if s.started < self.stop_signal < s.ended]
            tempfailed = sum(1 for s in opened if 400 <= s.code < 500)
            result.note = (f"stop {self.stop_seconds:.1f} s; {len(opened)} sessions open at the SIGTERM, "
                           f"{tempfailed} of them 4xx")
        return result

    def load(self, name: str, n: int, specials: dict, actions: dict, offset: int = 0) -> list[Sent]:
        """N messages over --concurrency sessions; ACTIONS run (in their own thread) as their index is reached."""
        lock = threading.Lock()
        next_index = [0]
        sent: list[Sent] = []
        helpers: list[threading.Thread] = []
        deadline = time.monotonic() + self.args.time_limit

        def worker() -> None:
            while time.monotonic() < deadline:
                with lock:
                    i = next_index[0]
                    if i >= n:
                        return
                    next_index[0] += 1
                    action = actions.pop(i, None)
                if action is not None:
                    helper = threading.Thread(target=action, name=f"{name}-{i}")
                    helper.start()
                    helpers.append(helper)
                mark = f"{name}-{i}"
                special = specials.get(i)
                raw = large_message(self.corpus[0]) if special == "large" else self.corpus[(i + offset) % len(self.corpus)]
                rcpts = special if isinstance(special, list) else [RCPT]
                data = f"X-Fault-Campaign: {mark}\r\n".encode() + raw
                t0 = time.monotonic()
                try:
                    code = self.pf.send(data, SENDER, rcpts, timeout=120).code
                except OSError:
                    code = 0  # could not talk to Postfix at all: counted under "other"
                with lock:
                    sent.append(Sent(mark, code, t0, time.monotonic()))

        threads = [threading.Thread(target=worker) for _ in range(self.args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for helper in helpers:
            helper.join(60)
        return sent


def corpus_files(subdirs=("spamassassin/ham", "spamassassin/spam", "modern/ham", "modern/spam")) -> list[Path]:
    """The corpus's message files under SUBDIRS, sorted."""
    root = corpus_dir()
    files = sorted(p for sub in subdirs for p in (root / sub).glob("*.eml"))
    if not files:
        raise SystemExit(f"no corpus under {root} (set MILTERGUARD_CORPUS)")
    return files


def corpus_messages(count: int) -> list[bytes]:
    """COUNT corpus messages, ham and spam alike, always the same ones."""
    files = corpus_files()
    chosen = random.Random(11).sample(files, min(count, len(files)))
    return [p.read_bytes() for p in chosen]


def large_message(raw: bytes) -> bytes:
    """RAW's headers and a 20 MB base64 attachment of text."""
    import base64

    head, _, _ = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    head = b"\n".join(line for line in head.split(b"\n")
                      if not line.lower().startswith((b"content-", b"mime-version")) and not line[:1].isspace())
    payload = base64.encodebytes(b"quarterly figures, line after line\n" * (LARGE_BYTES * 3 // 4 // 35))
    return (head + b"\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b1\n\n"
            b"--b1\nContent-Type: text/plain\n\nThe figures are attached.\n"
            b"--b1\nContent-Type: text/plain; name=figures.txt\nContent-Transfer-Encoding: base64\n"
            b"Content-Disposition: attachment; filename=figures.txt\n\n" + payload + b"--b1--\n")


def table(results: list[Result], args) -> str:
    lines = [f"{args.messages} corpus messages per fault, {args.concurrency} sessions at once, "
             f"{args.workers} workers; measured by `python bench/faults.py` on {time.strftime('%Y-%m-%d')}.",
             "",
             "| fault | accepted | delivered | held | lost | 4xx | 5xx | other | log lines | time | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        other = len(r.sent) - r.count(200) - r.count(400) - r.count(500)
        lines.append(f"| {r.fault} | {len(r.accepted())} | {len(r.delivered & r.accepted())} | "
                     f"{len(r.held & r.accepted())} | {len(r.lost())} | {r.count(400)} | {r.count(500)} | {other} | "
                     f"{len(r.log_lines)} | {r.seconds:.1f} s | {r.note} |")
    return "\n".join(lines)


def update_doc(text: str, begin: str = BEGIN, end: str = END) -> None:
    """TEXT into docs/reliability.md between the markers BEGIN and END (added at the end if missing)."""
    doc = DOC.read_text()
    if begin not in doc:
        doc = doc.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, _, rest = doc.partition(begin)
    _, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM (a kill, a session's end) unwinds like Ctrl-C, so that the `finally` of a run
    stops every server it started and removes its work directory."""
    def unwind(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)


def main(argv: list[str] | None = None) -> int:
    stop_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="messages per fault (default 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="SMTP sessions at once (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="milterguard worker processes (default 2)")
    parser.add_argument("--only", help="comma-separated faults to run (default: all, in order)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds of load per fault at most")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    parser.add_argument("--verbose", action="store_true", help="print the filter's log lines of each fault")
    parser.add_argument("--update-doc", action="store_true", help="write the table into docs/reliability.md")
    args = parser.parse_args(argv)
    for reason in (postfix_available(), clamd_available(), nsd_available(),
                   None if redis_available() else "redis-server is not installed"):
        if reason:
            print(f"faults: {reason}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="mg-faults-"))
    shutil.chown(work, "root")
    campaign = Campaign(work, args)
    results = []
    try:
        names = list(campaign.faults())
        if args.only:
            wanted = args.only.split(",")
            unknown = set(wanted) - set(names)
            if unknown:
                raise SystemExit(f"unknown faults: {', '.join(sorted(unknown))}; known: {', '.join(names)}")
            names = [n for n in names if n in wanted]
        for name in names:
            print(f"-- {name}: {campaign.faults()[name][0]}", file=sys.stderr, flush=True)
            result = campaign.run(name)
            results.append(result)
            if args.verbose:
                print("\n".join(f"   {line}" for line in result.log_lines), file=sys.stderr)
            if result.lost():
                print(f"   LOST: {sorted(result.lost())}", file=sys.stderr)
    finally:
        campaign.close()
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = table(results, args)
    print(text)
    if args.update_doc:
        update_doc(text)
    return 1 if any(r.lost() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
