#!/usr/bin/env python3
"""The memory soak: does a worker's memory stop growing after many messages?

    python bench/soak.py [--messages 200000] [--every 10000] [--concurrency 8]
                         [--workers N] [--max-minutes 90] [--keep] [--update-doc]

The servers are those of the fault campaign (bench/faults.py's Rig): a
private Postfix on loopback hands every session to `milterguard serve`
(one worker per core unless --workers says otherwise) and relays what it
accepts to Postfix's smtp-sink, which keeps nothing; Redis, clamd and nsd
run beside it on loopback ports.  Before the filter starts, the train split
of the SpamAssassin corpus is learned (`milterguard learn`) and the
classifier trained (`milterguard train`) in that Redis, so Bayes, the
classifier and the fuzzy hashes run on every message.

Then --concurrency threads send --messages messages, cycling through the
whole corpus (spam and ham of both parts, in a fixed shuffled order).  Each
copy gets a fresh Message-ID and an X-Soak header with its number, its
envelope sender is its From address, and each SMTP session (1 to 8
messages) comes, through XCLIENT, from another address of 198.18.0.0/15, so
the caches keyed by message, sender or client see new keys all along.

Every --every messages, and once more when the queue has drained, the RSS
and PSS (/proc/PID/smaps_rollup) of each worker and of the supervisor are
read.  The table gives them, the total, and the growth per 10,000 messages
of the workers' PSS and RSS since the row before.  Last, accepted (250)
must equal delivered (a `status=sent` line in Postfix's log for its queue
id) plus held (Postfix's hold queue, quarantine.mode mta-hold): the script
exits 1 if any is missing.

Needs root (Postfix), postfix, redis-server, clamd and nsd.  Every loop is
bounded in count and in time (--max-minutes stops the sending; the drain
has its own limit), and everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from faults import Rig, corpus_files, stop_cleanly_on_sigterm, update_doc  # noqa: E402  (also puts tests/ on sys.path)
from procmem import _rollup  # noqa: E402
from support import LOOPBACK, SupportError, corpus_dir, free_port, port_accepts, stop_process, wait_until  # noqa: E402
from support.clamd import clamd_available  # noqa: E402
from support.dns import nsd_available  # noqa: E402
from support.mailgen import strip_message_id  # noqa: E402
from support.postfix import postfix_available  # noqa: E402
from support.redis import redis_available  # noqa: E402

from milterguard.corpus import select  # noqa: E402

BEGIN, END = "<!-- soak table: bench/soak.py --update-doc -->", "<!-- end of soak table -->"
SENT = re.compile(r"/smtp\[\d+\]: ([0-9A-Za-z]+): to=<[^>]*>, relay=.*, status=sent ")
QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
RCPT = "user@example.net"
SEND_SUBDIRS = ("spamassassin/ham", "spamassassin/hard_ham", "spamassassin/spam", "modern/ham", "modern/spam")
LEARN_SPAM, LEARN_HAM = ("spamassassin/spam",), ("spamassassin/ham", "spamassassin/hard_ham")
DRAIN_LIMIT = 300.0  # seconds for Postfix's queue to empty after the load
SESSION_MAX = 8  # messages per SMTP session: 1 to this many


class PostfixSink:
    """Postfix's smtp-sink on a loopback port: accepts everything and keeps nothing.

    What it received is read from Postfix's log instead: a `status=sent`
    line per delivered queue id.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "PostfixSink":
        self.port = free_port()
        self.proc = subprocess.Popen([shutil.which("smtp-sink") or "/usr/sbin/smtp-sink", "-u", "nobody",
                                      f"{LOOPBACK}:{self.port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_accepts(self.port), timeout=10, what=f"smtp-sink on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)


@dataclass
class Row:
    messages: int
    seconds: float
    workers: dict[int, tuple[int, int]]  # pid -> (RSS, PSS) KiB
    supervisor: tuple[int, int]

    def workers_sum(self) -> tuple[int, int]:
        return (sum(r for r, _ in self.workers.values()), sum(p for _, p in self.workers.values()))


@dataclass
class Tally:
    accepted: dict[int, str] = field(default_factory=dict)  # number -> Postfix queue id
    codes: dict[str, int] = field(default_factory=dict)  # "2xx", "4xx", "5xx", "other" -> count
    done: int = 0

    def add(self, number: int, code: int, text: str) -> None:
        klass = f"{code // 100}xx" if 200 <= code < 600 else "other"
        self.codes[klass] = self.codes.get(klass, 0) + 1
        if 200 <= code < 300:
            found = QUEUED_AS.search(text)
            self.accepted[number] = found.group(1) if found else ""
        self.done += 1


def envelope_sender(raw: bytes) -> str:
    import email.parser
    import email.policy
    import email.utils

    head = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    found = [a for _, a in email.utils.getaddresses(head.get_all("From", [])) if "@" in a]
    return found[0] if found and found[0].isascii() and " " not in found[0] else "soak@example.org"


class Soak:
    def __init__(self, work: Path, args) -> None:
        self.args = args
        self.run_id = f"{int(time.time()):x}"
        files = corpus_files(SEND_SUBDIRS)
        random.Random(8).shuffle(files)
        self.corpus = []
        for path in files:
            raw = path.read_bytes()
            self.corpus.append((envelope_sender(raw), strip_message_id(raw)))
        self.sink = PostfixSink()
        self.rig = Rig(work, workers=args.workers, sink=self.sink, prepare=self.learn)
        self.tally = Tally()
        self.lock = threading.Lock()
        self.next_number = 0
        self.rows: list[Row] = []
        self.restarts: list[str] = []

    # ------------------------------------------------------------ set-up

    def learn(self, rig: Rig) -> None:
        """Learn the SpamAssassin train split in the rig's Redis and train the classifier."""
        root = corpus_dir()
        base = [sys.executable, "-m", "milterguard"]
        opts = ["--etc-dir", str(rig.mg.etc_dir)] + [a for k, v in rig.mg.sets.items() for a in ("--set", f"{k}={v}")]
        env = rig.mg._environ()
        for label, subdirs in (("--spam", LEARN_SPAM), ("--ham", LEARN_HAM)):
            paths = select(sorted(str(p) for sub in subdirs for p in (root / sub).glob("*.eml")), "train")
            started = time.monotonic()
            out = subprocess.run(base + ["learn"] + opts + [label, "--quiet"] + paths, env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=900)
            if out.returncode:
                raise SystemExit(f"learn {label} failed: {out.stderr[-2000:]}")
            log(f"learned {len(paths)} {label[2:]} in {time.monotonic() - started:.0f} s")
        out = subprocess.run(base + ["train"] + opts, env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=900)
        if out.returncode:
            raise SystemExit(f"train failed: {out.stderr[-2000:]}")
        log(f"trained: {(out.stdout or out.stderr).strip().splitlines()[-1:]}")

    # ------------------------------------------------------------ load

    def message(self, number: int) -> tuple[str, bytes]:
        sender, raw = self.corpus[number % len(self.corpus)]
        head = f"X-Soak: {number}\r\nMessage-ID: <soak.{number}.{self.run_id}@soak.example.org>\r\n".encode()
        return sender, head + raw

    def take(self, count: int) -> list[int]:
        with self.lock:
            first = self.next_number
            last = min(first + count, self.args.messages)
            self.next_number = last
        return list(range(first, last))

    def client(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        pf = self.rig.pf
        while time.monotonic() < deadline:
            numbers = self.take(rng.randint(1, SESSION_MAX))
            if not numbers:
                return
            addr = f"198.{18 + rng.randint(0, 1)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            results: list[tuple[int, int, str]] = []
            smtp = smtplib.SMTP(timeout=120)
            try:
                smtp.connect(pf.host, pf.smtpd_port)
                smtp.ehlo("soak.example.org")
                smtp.docmd("XCLIENT", f"ADDR={addr} NAME=[UNAVAILABLE] HELO=mail{rng.randint(0, 9999)}.example.org")
                smtp.ehlo_resp = smtp.helo_resp = None
                smtp.esmtp_features = {}
                smtp.ehlo("soak.example.org")
                for number in numbers:
                    sender, data = self.message(number)
                    code, resp = smtp.mail(sender)
                    if code == 250:
                        code, resp = smtp.rcpt(RCPT)
                    if code == 250:
                        try:
                            code, resp = smtp.data(data)
                        except smtplib.SMTPDataError as exc:
                            code, resp = exc.smtp_code, exc.smtp_error
                    else:
                        smtp.rset()
                    results.append((number, code, resp.decode("utf-8", "replace")
                                    if isinstance(resp, bytes) else str(resp)))
            except (smtplib.SMTPException, OSError) as exc:
                code = getattr(exc, "smtp_code", 0)
                done = {n for n, _, _ in results}
                results += [(n, code, str(exc)) for n in numbers if n not in done]
            finally:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    pass
                smtp.close()
            with self.lock:
                for number, code, text in results:
                    self.tally.add(number, code, text)

    def sample(self, messages: int, started: float) -> Row:
        mg = self.rig.mg
        workers = {}
        for pid in sorted(mg.worker_pids()):
            got = _rollup(pid)
            if got:
                workers[pid] = got
        row = Row(messages, time.monotonic() - started, workers, _rollup(mg.pid) or (0, 0))
        if self.rows and set(row.workers) != set(self.rows[-1].workers):
            self.restarts.append(f"worker pids changed before {messages}: "
                                 f"{sorted(self.rows[-1].workers)} -> {sorted(row.workers)}")
        self.rows.append(row)
        rss, pss = row.workers_sum()
        log(f"{messages:>7} messages {row.seconds:7.0f} s  workers RSS {rss / 1024:6.1f} PSS {pss / 1024:6.1f} MiB  "
            + "  ".join(f"{pid}: {r / 1024:.1f}/{p / 1024:.1f}" for pid, (r, p) in row.workers.items()))
        return row

    def run(self) -> None:
        args = self.args
        started = time.monotonic()
        deadline = started + args.max_minutes * 60
        self.sample(0, started)
        threads = [threading.Thread(target=self.client, args=(k, deadline), name=f"client-{k}", daemon=True)
                   for k in range(args.concurrency)]
        for thread in threads:
            thread.start()
        marks = [m for m in range(args.every, args.messages + 1, args.every)]
        if args.first and args.first < args.every:
            marks.insert(0, args.first)
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 180:
            with self.lock:
                done = self.tally.done
            while marks and done >= marks[0]:
                self.sample(done, started)
                marks.pop(0)
            time.sleep(0.2)
        for thread in threads:
            thread.join(5)
        self.load_seconds = time.monotonic() - started
        log(f"load ended after {self.load_seconds:.0f} s; draining Postfix's queue")
        self.drain()
        self.sample(self.tally.done, started)

    def drain(self) -> None:
        pf = self.rig.pf
        deadline = time.monotonic() + DRAIN_LIMIT
        while time.monotonic() < deadline:
            if not [m for m in pf.queue() if m.get("queue_name") != "hold"]:
                return
            pf.flush()
            time.sleep(1)
        log("the queue did not drain in time")

    def delivered_numbers(self) -> set[int]:
        sent_ids = set()
        with open(self.rig.pf.log_file, errors="replace") as log_file:
            for line in log_file:
                found = SENT.search(line)
                if found:
                    sent_ids.add(found.group(1))
        return {n for n, qid in self.tally.accepted.items() if qid and qid in sent_ids}

    def held_numbers(self) -> set[int]:
        held_ids = set(self.rig.pf.hold_queue())
        return {n for n, qid in self.tally.accepted.items() if qid and qid in held_ids}

    def close(self) -> None:
        self.rig.close()


def log(text: str) -> None:
    print(f"soak {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def table(soak: Soak, accepted: int, delivered: int, held: int, lost: int) -> str:
    args, rows, tally = soak.args, soak.rows, soak.tally
    nworkers = max(len(r.workers) for r in rows)
    rate = tally.done / soak.load_seconds if soak.load_seconds else 0.0
    head = ["messages"] + [f"worker {k + 1} RSS / PSS" for k in range(nworkers)] + [
        "supervisor RSS / PSS", "workers RSS / PSS", "all RSS / PSS", "workers' growth per 10k, RSS / PSS"]
    lines = [f"{tally.done} messages ({len(soak.corpus)} corpus messages in turn, a fresh Message-ID each) "
             f"through Postfix, {args.concurrency} sessions at once, {nworkers} workers, Bayes, the classifier "
             f"and fuzzy hashes on (the SpamAssassin train split learned and trained); {rate:.0f} msg/s; "
             f"measured by `python bench/soak.py` on {time.strftime('%Y-%m-%d')}. Memory in MiB.",
             "",
             "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for k, row in enumerate(rows):
        cells = [f"{row.messages:,}"]
        workers = list(row.workers.values())
        cells += [f"{mib(r)} / {mib(p)}" for r, p in workers] + ["–"] * (nworkers - len(workers))
        wr, wp = row.workers_sum()
        sr, sp = row.supervisor
        cells += [f"{mib(sr)} / {mib(sp)}", f"{mib(wr)} / {mib(wp)}", f"{mib(wr + sr)} / {mib(wp + sp)}"]
        prev = rows[k - 1] if k else None
        if prev is not None and row.messages > prev.messages:
            pr, pp = prev.workers_sum()
            scale = 10000 / (row.messages - prev.messages)
            cells.append(f"{(wr - pr) * scale / 1024:+.2f} / {(wp - pp) * scale / 1024:+.2f}")
        else:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    codes = ", ".join(f"{k} {v}" for k, v in sorted(tally.codes.items()))
    lines += ["", f"Answers: {codes}. Accepted {accepted} = delivered {delivered} + held {held}; lost {lost}."]
    if soak.restarts:
        lines.append("Workers replaced during the run: " + "; ".join(soak.restarts) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    stop_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200000, help="messages to send (default 200000)")
    parser.add_argument("--every", type=int, default=10000, help="sample memory every this many messages")
    parser.add_argument("--first", type=int, default=1000, help="one more sample after this many (0: none)")
    parser.add_argument("--concurrency", type=int, default=8, help="SMTP sessions at once (default 8)")
    parser.add_argument("--workers", type=int, default=None, help="milterguard workers (default: serve's own)")
    parser.add_argument("--max-minutes", type=float, default=90.0, help="stop sending after this long")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    parser.add_argument("--update-doc", action="store_true", help="write the table into docs/reliability.md")
    args = parser.parse_args(argv)
    for reason in (postfix_available(), clamd_available(), nsd_available(),
                   None if redis_available() else "redis-server is not installed"):
        if reason:
            log(reason)
            return 2
    work = Path(tempfile.mkdtemp(prefix="mg-soak-"))
    shutil.chown(work, "root")
    soak = Soak(work, args)
    try:
        soak.run()
        accepted_set = set(soak.tally.accepted)
        delivered_set = soak.delivered_numbers()
        held_set = soak.held_numbers() - delivered_set
        lost = accepted_set - delivered_set - held_set
    finally:
        soak.close()
        if args.keep:
            log(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = table(soak, len(accepted_set), len(delivered_set), len(held_set), len(lost))
    print(text, flush=True)
    if lost:
        log(f"LOST: {sorted(lost)[:50]}")
    if args.update_doc:
        update_doc(text, BEGIN, END)
    return 1 if lost else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SupportError as exc:
        log(f"error: {exc}")
        sys.exit(2)
