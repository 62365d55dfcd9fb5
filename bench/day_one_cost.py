"""What day-one protection costs the engine: the shipped model and the lure rules, on and off.

Not a test: run it by hand after touching the shipped model's tokens, the
lure rules or the brand check, and compare with "Day-one cost" in
docs/performance.md.

    python bench/day_one_cost.py [--corpus DIR] [--rounds 3] [--checkout NAME=DIR ...]

No Redis and DNS off, as a site runs on its first day.  Scanned: the test
split of the shared corpus, 100 modern spam, 100 modern ham and 100
SpamAssassin ham (the first of each, in the split's order).  Four
configurations, each in a process of its own (the engine of `milterguard
bench`, one message at a time): everything on; the shipped model off
(`ml.default_model=`); the lures off (rules/lures.yaml left out of
`rules.files` and the brand check in `checks.disabled`); both off.  The
driver has them scan the same message one after the other, in a shuffled
order, so that the machine's load falls on all alike.  Printed per
configuration: the CPU time of the scanning thread per message (median and
mean; `time.thread_time`, which holds better than wall time on a shared
machine), and what the shipped model and the lures add to the median.

With `--checkout NAME=DIR` (repeatable) other source trees are measured in
the same rounds: before and after a change, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchenv import BenchEnv, checkout_arguments

HERE = Path(__file__).resolve().parent.parent
PER_SET = 100  # messages of each of the three sets

# NO_LURES: every rule file of the tree's rules/ but lures.yaml, and the brand check disabled.
CONFIGS = {
    "all on": [],
    "shipped model off": ['ml.default_model='],
    "lures off": ["NO_LURES"],
    "both off": ['ml.default_model=', "NO_LURES"],
}


def _messages(corpus: Path) -> list[str]:
    from milterguard.corpus import select
    from milterguard.mail.raw import iter_message_files

    out: list[str] = []
    for sub in ("modern/spam", "modern/ham", "spamassassin/ham"):
        out += sorted(select(list(iter_message_files([str(corpus / sub)])), "test"))[:PER_SET]
    return out


def _rules_without_lures(tree: str) -> list[str]:
    """The tree's rule files, with rules/lures.yaml replaced by a copy that keeps only its group
    and the symbols that checks emit (declared there, matched by no rule)."""
    import tempfile

    import yaml

    rules = Path(tree) / "rules"
    entries = [e for e in yaml.safe_load((rules / "lures.yaml").read_text(encoding="utf-8"))
               if "match" not in e and "expr" not in e]
    out = Path(tempfile.mkdtemp(prefix="mg-nolures-")) / "lures.yaml"
    out.write_text(yaml.safe_dump(entries, allow_unicode=True), encoding="utf-8")
    return sorted(str(p) for p in rules.glob("*.yaml") if p.name != "lures.yaml") + [str(out)]


def worker(args) -> int:
    """Scan message I for each line I read; answer the thread's CPU seconds it took."""
    from milterguard.cli.common import load, load_engine
    from milterguard.cli.scan import build
    from milterguard.mail.raw import read_message

    sets = ["dns.enabled=false", *args.sets]
    if "NO_LURES" in sets:
        sets.remove("NO_LURES")
        sets += ["checks.disabled=[brand_impersonation]", "rules.files=" + json.dumps(_rules_without_lures(args.tree))]
    cfg_args = argparse.Namespace(etc_dir=None, config=[], sets=sets)
    engine = load_engine(cfg_args, load(cfg_args))
    raws = [read_message(p) for p in json.loads(sys.stdin.readline())]

    print("ready", flush=True)
    for line in sys.stdin:
        i = int(line)
        conn, txn = build(BenchEnv, raws[i], i)
        c0 = time.thread_time()
        engine.evaluate(conn, txn)
        print(f"{time.thread_time() - c0:.9f}", flush=True)
    return 0


def drive(args) -> int:
    checkouts = [("this", str(HERE))] + [tuple(c.split("=", 1)) for c in args.checkout]
    messages = _messages(Path(args.corpus))
    if not messages:
        print(f"no messages under {args.corpus}", file=sys.stderr)
        return 1
    me = str(Path(__file__).resolve())
    procs = {}
    for name, tree in checkouts:
        env = dict(os.environ, PYTHONPATH=tree)
        for config, sets in CONFIGS.items():
            proc = subprocess.Popen([sys.executable, me, "--worker", "--tree", tree,
                                     *[a for s in sets for a in ("--set", s)]],
                                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            proc.stdin.write(json.dumps(messages) + "\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"worker {name} {config} did not start")
            procs[(name, config)] = proc
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in procs}
    order = list(procs)
    rng = random.Random(0)
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms up (imports, caches, the model)
            for i in range(len(messages)):
                rng.shuffle(order)
                for key in order:
                    proc = procs[key]
                    proc.stdin.write(f"{i}\n")
                    proc.stdin.flush()
                    used = float(proc.stdout.readline())
                    if round_:
                        cpu[key].append(used)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(30)
    rows = []
    for name, _tree in checkouts:
        med = {config: statistics.median(cpu[(name, config)]) for config in CONFIGS}
        for config in CONFIGS:
            values = cpu[(name, config)]
            rows.append({"checkout": name, "configuration": config, "messages": len(values),
                         "median_ms": round(1000 * med[config], 3),
                         "mean_ms": round(1000 * statistics.mean(values), 3)})
        rows.append({"checkout": name, "configuration": "added by the shipped model (median)",
                     "median_ms": round(1000 * (med["all on"] - med["shipped model off"]), 3)})
        rows.append({"checkout": name, "configuration": "added by the lures (median)",
                     "median_ms": round(1000 * (med["all on"] - med["lures off"]), 3)})
        rows.append({"checkout": name, "configuration": "added by both (median)",
                     "median_ms": round(1000 * (med["all on"] - med["both off"]), 3)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{len(messages)} messages x {args.rounds} rounds, no Redis, DNS off, CPU time of the scanning thread\n")
    print("| checkout | configuration | median | mean |")
    print("|---|---|---:|---:|")
    for r in rows:
        mean = f"{r['mean_ms']:.3f} ms" if "mean_ms" in r else ""
        print(f"| {r['checkout']} | {r['configuration']} | {r['median_ms']:.3f} ms | {mean} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkout_arguments(parser, "the shared corpus (with modern/{spam,ham} and spamassassin/ham)")
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
