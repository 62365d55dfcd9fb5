#!/usr/bin/env python3
"""The cost of keeping held mail in milterguard's quarantine, against the MTA's hold queue.

    python bench/quarantine.py [--rounds 5] [--messages 300] [--concurrency 8] [--workers N]
                               [--out FILE.json]

Two private Postfix instances on loopback, each with its own milterguard; every
message is the ~4 KB corpus spam of bench/run.py with the review canary
(MILTERGUARD-CANARY-REVIEW) appended, so every one of them is held:

  store     quarantine.mode=store: milterguard writes the message into its SQLite
            quarantine and answers discard; Postfix drops its queue file
  mta-hold  quarantine.mode=mta-hold: milterguard answers quarantine; Postfix
            keeps the message in its hold queue (emptied after each round)

smtp-source sends each round, one message per connection; a round lasts from
its start until it exits, which is after the last message's final reply, and
that reply comes after milterguard has stored or held the message.  Rounds
alternate the order of the two (store first, then mta-hold first) so that
drift hits both alike.  Each round checks that every message was stored or
held.  Everything listens on 127.0.0.1; DNS is off; every loop is bounded in
count and time.  Needs root (Postfix) and postfix's smtp-source and smtp-sink.
See docs/quarantine.md and docs/performance.md for the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

from support import SupportError, session_members, wait_until  # noqa: E402
from support.milterguard_proc import MilterguardProcess  # noqa: E402
from support.postfix import PostfixInstance, postfix_available  # noqa: E402

from loadgen import SinkCounter, run_smtp_source  # noqa: E402
from procmem import cpu_seconds  # noqa: E402
from run import DEFAULT_MESSAGE, POSTFIX_BENCH_CF, RCPT, environment, log, prepare_message  # noqa: E402

from milterguard.stores.quarantine import Quarantine  # noqa: E402

MODES = ("store", "mta-hold")
CANARY = b"\nMILTERGUARD-CANARY-REVIEW\n"


class Setup:
    """A Postfix, its milterguard with one quarantine mode, and a sink nothing reaches."""

    def __init__(self, root: Path, mode: str, workers: int | None) -> None:
        self.mode = mode
        workdir = root / mode
        workdir.mkdir(parents=True)
        workdir.chmod(0o755)
        self.sink = SinkCounter(workdir / "sink").start()
        self.url = f"sqlite:///{workdir}/mg/quarantine/quarantine.db"
        self.milter = MilterguardProcess(workdir / "mg", workers=workers, sets={
            "quarantine.mode": mode, "quarantine.url": self.url, "dns.enabled": "false"})
        self.postfix: PostfixInstance | None = None
        try:
            self.milter.start()
            self.postfix = PostfixInstance(workdir / "postfix", milter=self.milter.postfix_socket,
                                           relay_port=self.sink.port, extra_main_cf=POSTFIX_BENCH_CF,
                                           milter_default_action=POSTFIX_BENCH_CF["milter_default_action"])
            self.postfix.start()
        except BaseException:
            self.stop()
            raise

    def held(self) -> int:
        """Messages held so far: stored in the quarantine, or in Postfix's hold queue."""
        if self.mode == "store":
            store = Quarantine(self.url)
            try:
                return store.stats()["messages"]
            finally:
                store.close()
        return len(self.postfix.hold_queue())

    def cpu(self) -> float:
        """CPU seconds of milterguard's processes and of Postfix's (each with its reaped children)."""
        pids = session_members(self.milter.proc.pid) + self.postfix.session_pids()
        return sum(cpu_seconds(pid) for pid in pids)

    def stop(self) -> None:
        for thing in (self.postfix, self.milter, self.sink):
            if thing is not None:
                thing.stop()


def one_round(setup: Setup, message: Path, sender: str, messages: int, concurrency: int, timeout: float) -> dict:
    before, cpu_before = setup.held(), setup.cpu()
    src = run_smtp_source(setup.postfix.smtpd_port, message, messages=messages, sessions=concurrency,
                          sender=sender, rcpt=RCPT, timeout=timeout)
    seconds = src.finished - src.started
    cpu = setup.cpu() - cpu_before
    # Every message was stored or held before its reply; this only counts them (30 s at most).
    try:
        wait_until(lambda: setup.held() - before >= messages, 30, interval=0.2, what=f"{messages} messages held")
    except SupportError:
        pass  # recorded below as fewer held than sent
    held = setup.held() - before
    if setup.mode == "mta-hold":
        setup.postfix.run("postsuper", "-d", "ALL", "hold")
    return {"mode": setup.mode, "messages": messages, "held": held, "seconds": round(seconds, 3),
            "rate": round(messages / seconds, 1), "cpu_ms_per_msg": round(1000 * cpu / messages, 2),
            "source_rc": src.returncode, "timed_out": src.timed_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=300, help="messages per round and mode")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel SMTP sessions")
    parser.add_argument("--workers", type=int, default=None, help="milterguard workers (default: its own)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of one round, in seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    reason = postfix_available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="mg-bench-quarantine-"))
    root.chmod(0o755)
    message = root / "review.eml"
    facts = prepare_message(DEFAULT_MESSAGE, message)
    message.write_bytes(message.read_bytes().rstrip(b"\n") + CANARY)
    setups: list[Setup] = []
    rounds: list[dict] = []
    try:
        for mode in MODES:
            setups.append(Setup(root, mode, args.workers))
        for setup in setups:  # warm-up: workers forked, rules loaded, the quarantine file created
            one_round(setup, message, facts["sender"], 20, args.concurrency, args.timeout)
        for index in range(args.rounds):
            for setup in (setups if index % 2 == 0 else setups[::-1]):
                rec = one_round(setup, message, facts["sender"], args.messages, args.concurrency, args.timeout)
                rec["round"] = index + 1
                rounds.append(rec)
                log(f"round {index + 1} {rec['mode']:8} {rec['rate']:7.1f} msg/s  "
                    f"{rec['cpu_ms_per_msg']:6.2f} ms CPU/msg  held {rec['held']}/{rec['messages']}")
        size = (root / "store" / "mg" / "quarantine" / "quarantine.db").stat().st_size
    finally:
        for setup in setups:
            setup.stop()

    summary = {}
    for mode in MODES:
        mine = [r for r in rounds if r["mode"] == mode]
        complete = all(r["held"] == r["messages"] and not r["timed_out"] for r in mine)
        summary[mode] = {"median_rate": statistics.median(r["rate"] for r in mine),
                         "rates": [r["rate"] for r in mine],
                         "median_cpu_ms_per_msg": statistics.median(r["cpu_ms_per_msg"] for r in mine),
                         "complete": complete}
    result = {"date": time.strftime("%Y-%m-%d"), "message": facts, "rounds": args.rounds,
              "messages": args.messages, "concurrency": args.concurrency, "workers": args.workers,
              "quarantine_db_bytes": size, "summary": summary, "per_round": rounds, "environment": environment()}
    print()
    print("| mode | messages/s (median) | per round | CPU ms/msg (milterguard + Postfix) | all held |")
    print("|---|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['median_rate']:.1f} | {', '.join(f'{r:.0f}' for r in s['rates'])} | "
              f"{s['median_cpu_ms_per_msg']:.2f} | {'yes' if s['complete'] else 'NO'} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(s["complete"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
