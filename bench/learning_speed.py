"""The cost of learning in the engine alone: Bayes, the classifier and fuzzy hashes, on and off.

Not a test: run it by hand after touching the tokens, the Bayes store, the
classifier or the fuzzy hashes, and compare with "Learning cost" in
docs/performance.md.

    python bench/learning_speed.py [--corpus DIR] [--rounds 3] [--checkout NAME=DIR ...]

It starts a redis-server of its own (loopback, a free port, a temporary
directory, no persistence), learns the train split of the SpamAssassin
corpus (spam, ham, hard ham) and trains the classifier, then scans the
held-out (test split) spam, DNS off, under five configurations: no Redis
(learning off), Bayes + classifier + fuzzy, and each alone.  Each
configuration runs in a process of its own (the engine of `milterguard
bench`, one message at a time); the driver has them scan the same message
one after the other, in a shuffled order, message by message, so that
load from other work on the machine falls on all of them alike.  Printed:
messages per second of engine time, p50 and p99 per message, what each
configuration adds to the median and p99 of "no Redis", and the mean CPU
time per message of the filter's process and of the Redis server (its main
thread, read from INFO before and after each message; INFO's own cost is
in the "no Redis" row too): CPU times hold better than wall times on a
machine shared with other work.

The Bayes token cache of each process (stores/bayes_cache.py) is emptied
at the start of each round, so that no message it scans was looked up
before by that process; with `--warm` it is then filled by the look-ups of
the held-out ham and hard ham, as after a stream of other mail. The share of
tokens found in the cache is printed.

With `--checkout NAME=DIR` (repeatable) the same is done for other source
trees (each learns under a Redis key prefix of its own), interleaved with
the others: before and after a change, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from benchenv import BenchEnv, checkout_arguments

HERE = Path(__file__).resolve().parent.parent
CONFIGS = {
    "no Redis (learning off)": [],
    "Bayes + classifier + fuzzy": ["REDIS"],
    "Bayes only": ["REDIS", "ml.enabled=false", "fuzzy.enabled=false"],
    "classifier only": ["REDIS", "bayes.enabled=false", "fuzzy.enabled=false"],
    "fuzzy only": ["REDIS", "bayes.enabled=false", "ml.enabled=false"],
}
MAX_MESSAGES = 2000  # bound on the messages scanned per round


def _split(corpus: Path, kind: str, split: str) -> list[str]:
    from milterguard.corpus import select
    from milterguard.mail.raw import iter_message_files

    return sorted(select(list(iter_message_files([str(corpus / "spamassassin" / kind)])), split))


# ------------------------------------------------------------ in a checkout's own process

def setup(args) -> int:
    """Learn the train split under the prefix given and train the classifier."""
    from milterguard.cli.common import load
    from milterguard.cli.learn import learn_paths
    from milterguard.clients.redis_client import RedisStore
    from milterguard.stores import models as ml
    from milterguard.stores.bayes import Bayes

    config = load(argparse.Namespace(etc_dir=None, config=[], sets=[f"redis.url={args.redis}",
                                                                      f"redis.prefix={args.prefix}"]))
    store = RedisStore.from_config(config)
    bayes = Bayes(store, max_samples=1_000_000)
    corpus = Path(args.corpus)
    t0 = time.monotonic()
    learn_paths(bayes, config, _split(corpus, "spam", "train"), "spam")
    learn_paths(bayes, config, _split(corpus, "ham", "train") + _split(corpus, "hard_ham", "train"), "ham")
    learned = time.monotonic() - t0
    t0 = time.monotonic()
    model = ml.train(store)
    print(json.dumps({"learn_s": round(learned, 1), "train_s": round(time.monotonic() - t0, 1),
                      "samples": model.samples}), flush=True)
    return 0


def worker(args) -> int:
    """Scan message I for each line I read; answer the seconds it took (as `milterguard bench`)."""
    from milterguard.cli.common import load, load_engine
    from milterguard.cli.scan import build
    from milterguard.mail.raw import read_message

    sets = ["dns.enabled=false", "bayes.autolearn=false"] + [
        s for s in args.sets if s != "REDIS"]
    if "REDIS" in args.sets:
        sets += [f"redis.url={args.redis}", f"redis.prefix={args.prefix}"]
    cfg_args = argparse.Namespace(etc_dir=None, config=[], sets=sets)
    engine = load_engine(cfg_args, load(cfg_args))
    raws = [read_message(p) for p in json.loads(sys.stdin.readline())]
    warm = _warm_hashes(json.loads(sys.stdin.readline()))

    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith(("clear", "stats")):  # the token cache, in a tree that has one
            print(json.dumps(_token_cache(clear=line.startswith("clear"), warm=warm)), flush=True)
            continue
        i = int(line)
        c0 = time.process_time()
        t0 = time.perf_counter()
        conn, txn = build(BenchEnv, raws[i], i)
        engine.evaluate(conn, txn)
        print(f"{time.perf_counter() - t0:.9f} {time.process_time() - c0:.9f}", flush=True)
    return 0


def _warm_hashes(paths: list[str]) -> list:
    from milterguard.learn.linear import token_hashes
    from milterguard.learn.tokens import tokenize
    from milterguard.mail.message import Message
    from milterguard.mail.raw import read_message

    return [token_hashes(tokenize(Message.from_bytes(read_message(p)))) for p in paths]


def _token_cache(clear: bool, warm: list) -> dict:
    """Tokens looked up and found in this process's Bayes token cache since it was last cleared;
    with `clear`, empty it, then fill it with the Bayes look-ups of the `warm` messages."""
    from milterguard.checks import learning

    out = {"lookups": 0, "hits": 0}
    for bayes in getattr(learning, "_BAYES", {}).values():
        cache = bayes.cache() if hasattr(bayes, "cache") else None
        if cache is not None:
            out["lookups"] += cache.lookups
            out["hits"] += cache.hits
            if clear:
                cache.clear()
                for hashes in warm:
                    bayes.fetch_values(hashes)
                cache.lookups = cache.hits = 0
    return out


# ------------------------------------------------------------ the driver

def _pct(values: list[float], fraction: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))]


def drive(args) -> int:
    from milterguard.cli.evaluate import private_redis

    checkouts = [("this", str(HERE))] + [tuple(c.split("=", 1)) for c in args.checkout]
    corpus = Path(args.corpus)
    messages = _split(corpus, "spam", "test")[: min(args.limit or MAX_MESSAGES, MAX_MESSAGES)]
    if not messages:
        print(f"no test spam under {corpus}/spamassassin/spam", file=sys.stderr)
        return 1
    # With --warm, each round's token cache starts filled by the look-ups of the held-out ham
    # (as after a stream of other mail); without, empty. Either way no scanned message is in it.
    warm = _split(corpus, "ham", "test") + _split(corpus, "hard_ham", "test") if args.warm else []
    me = str(Path(__file__).resolve())
    with private_redis() as url:
        procs = {}
        for name, tree in checkouts:
            env = dict(os.environ, PYTHONPATH=tree)
            prefix = f"mg-{name}:"
            out = subprocess.run([sys.executable, me, "--setup", "--redis", url, "--prefix", prefix,
                                  "--corpus", str(corpus)], env=env, check=True, capture_output=True, text=True,
                                 timeout=1800)
            print(f"{name}: learned and trained: {out.stdout.strip()}", file=sys.stderr)
            for config, sets in CONFIGS.items():
                proc = subprocess.Popen([sys.executable, me, "--worker", "--redis", url, "--prefix", prefix,
                                         *[a for s in sets for a in ("--set", s)]],
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                proc.stdin.write(json.dumps(messages) + "\n" + json.dumps(warm) + "\n")
                proc.stdin.flush()
                if proc.stdout.readline().strip() != "ready":
                    raise SystemExit(f"worker {name} {config} did not start")
                procs[(name, config)] = proc
        import redis

        server = redis.Redis.from_url(url)

        def redis_cpu() -> float:
            info = server.info("cpu")
            return float(info.get("used_cpu_user_main_thread", info["used_cpu_user"])) + float(
                info.get("used_cpu_sys_main_thread", info["used_cpu_sys"]))

        try:
            times: dict[tuple[str, str], list[float]] = {key: [] for key in procs}
            cpu: dict[tuple[str, str], list[float]] = {key: [] for key in procs}
            server_cpu: dict[tuple[str, str], list[float]] = {key: [] for key in procs}
            order = list(procs)
            rng = random.Random(0)
            hits: dict[tuple[str, str], list[int]] = {key: [0, 0] for key in procs}
            for round_ in range(args.rounds + 1):  # round 0 warms up (imports, caches, the model)
                for key, proc in procs.items():
                    # Every round starts with an empty token cache: no message is seen twice by it.
                    proc.stdin.write("clear\n")
                    proc.stdin.flush()
                    seen = json.loads(proc.stdout.readline())
                    if round_ > 1:  # what the round before found
                        hits[key][0] += seen["hits"]
                        hits[key][1] += seen["lookups"]
                for i in range(len(messages)):
                    rng.shuffle(order)
                    for key in order:
                        proc = procs[key]
                        before = redis_cpu()
                        proc.stdin.write(f"{i}\n")
                        proc.stdin.flush()
                        elapsed, used = (float(v) for v in proc.stdout.readline().split())
                        if round_:
                            times[key].append(elapsed)
                            cpu[key].append(used)
                            server_cpu[key].append(redis_cpu() - before)
            for key, proc in procs.items():
                proc.stdin.write("stats\n")
                proc.stdin.flush()
                seen = json.loads(proc.stdout.readline())
                hits[key][0] += seen["hits"]
                hits[key][1] += seen["lookups"]
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(30)
    rows = []
    for name, _tree in checkouts:
        base = times[(name, "no Redis (learning off)")]
        for config in CONFIGS:
            t = times[(name, config)]
            rows.append({
                "checkout": name, "configuration": config, "messages": len(t),
                "per_second": round(len(t) / sum(t), 1),
                "p50_ms": round(1000 * _pct(t, 0.5), 2), "p99_ms": round(1000 * _pct(t, 0.99), 2),
                "added_p50_ms": round(1000 * (_pct(t, 0.5) - _pct(base, 0.5)), 2),
                "added_p99_ms": round(1000 * (_pct(t, 0.99) - _pct(base, 0.99)), 2),
                "cpu_ms": round(1000 * sum(cpu[(name, config)]) / len(t), 2),
                "redis_cpu_ms": round(1000 * sum(server_cpu[(name, config)]) / len(t), 2),
                "cache_hit_rate": round(hits[(name, config)][0] / hits[(name, config)][1], 3)
                if hits[(name, config)][1] else None,
            })
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{len(messages)} held-out spam x {args.rounds} rounds, DNS off, one message at a time; token cache "
          f"{'filled by ' + str(len(warm)) + ' held-out ham' if args.warm else 'empty'} at each round\n")
    print("| checkout | configuration | messages/s | p50 | p99 | added p50 | added p99 | CPU/msg | Redis CPU/msg "
          "| token cache hits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkout']} | {r['configuration']} | {r['per_second']:.0f} | {r['p50_ms']:.2f} ms | "
              f"{r['p99_ms']:.1f} ms | {r['added_p50_ms']:+.2f} ms | {r['added_p99_ms']:+.1f} ms | "
              f"{r['cpu_ms']:.2f} ms | {r['redis_cpu_ms']:.2f} ms | "
              f"{'-' if r['cache_hit_rate'] is None else format(r['cache_hit_rate'], '.1%')} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkout_arguments(parser, "the shared corpus (with spamassassin/{spam,ham,hard_ham})")
    parser.add_argument("--limit", type=int, default=0, help="use at most this many messages")
    parser.add_argument("--warm", action="store_true",
                        help="start each round with the Bayes token cache filled by the held-out ham's look-ups")
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.setup:
        return setup(args)
    if args.worker:
        return worker(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
