"""Accuracy on a spam and a ham corpus: learn the train split, train, and score the test split.

The split is fixed by file name (see `milterguard.corpus`), so anyone can
repeat a figure.  The train split is learned into Bayes and the classifier
is trained on it; every test message is then scored by the full engine
(rules, Bayes and the classifier) with DNS checks off.  Reported for Bayes
alone, the classifier alone, the rules alone, rules + Bayes and the full
score: ROC AUC, the share of spam missed when at most 0.1 % and 1 % of ham
may be flagged, and for the scores false positives and negatives at the
thresholds.

Redis: without `redis.url` a private redis-server is started in a
temporary directory and stopped at the end; with one, everything goes
under a key prefix of its own, deleted at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from milterguard import settings as S
from milterguard.cli.common import CliError, load, load_engine, report
from milterguard.cli.learn import learn_paths
from milterguard.corpus import Progress, select
from milterguard.stores import models as ml
from milterguard.stores.bayes import Bayes
from milterguard.mail.raw import iter_message_files, read_message
from milterguard.clients.redis_client import RedisStore, RedisUnavailable

LEARNED_GROUPS = {"bayes": ("BAYES_",), "classifier": ("ML_",)}  # ML_ takes in the shipped model's ML_DEFAULT_*


def add_arguments(parser) -> None:
    parser.add_argument("--spam", action="append", default=[], metavar="DIR", help="spam messages (repeatable)")
    parser.add_argument("--ham", action="append", default=[], metavar="DIR", help="ham messages (repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--progress", action="store_true", default=None, help="draw progress bars even when not on a terminal")
    parser.add_argument("--details", metavar="FILE", help="write one JSON line per test message (scores and probabilities)")
    parser.add_argument("--corpus", metavar="DIR",
                        help="instead of --spam/--ham: every corpus under DIR (spamassassin/, modern/...), out of the "
                             "box and trained, and a time split (see docs/accuracy.md)")
    parser.add_argument("--time-split", default="modern", metavar="NAME",
                        help="with --corpus: the corpus tested on its newest quarter by Date (default modern)")
    parser.add_argument("--alpha", type=float, default=ml.DEFAULT_ALPHA, help="regularisation of the classifier (see train)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of our own on loopback, without persistence; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise CliError("no redis.url given and no redis-server installed to start one")
    with tempfile.TemporaryDirectory(prefix="milterguard-evaluate-") as tmp:
        port = _free_port()
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", tmp, "--protected-mode", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise CliError("the private redis-server did not start") from None
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def miss_at_fp(labels: list[int], scores: list[float], fp_rate: float) -> float:
    """Share of spam missed at the best cut that flags at most fp_rate of ham."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    best = max((t for f, t in zip(fpr, tpr) if f <= fp_rate + 1e-12), default=0.0)
    return 1.0 - float(best)


def summarise(labels: list[int], scores: list[float]) -> dict:
    from sklearn.metrics import roc_auc_score

    return {
        "auc": round(float(roc_auc_score(labels, scores)), 5),
        "miss_at_0.1pct_fp": round(miss_at_fp(labels, scores, 0.001), 4),
        "miss_at_1pct_fp": round(miss_at_fp(labels, scores, 0.01), 4),
    }


def _learned_weight(verdict, prefixes: tuple[str, ...]) -> float:
    return sum(h.weight for h in verdict.hits if h.symbol.startswith(prefixes))


def run(args) -> int:
    if args.corpus:
        from milterguard.cli.evaluate_corpus import run_corpus

        try:
            return run_corpus(args)
        except RedisUnavailable as exc:
            return report(CliError(f"Redis not reachable: {exc}", status=75))
        except CliError as exc:
            return report(exc)
    if not args.spam or not args.ham:
        return report(CliError("give --spam DIR and --ham DIR"))
    from milterguard.cli.evaluate_corpus import trail_sets

    # Offline, as the figures are compared, and without autolearn, which would learn the test split.
    sets = ["bayes.autolearn=false"] + (["dns.enabled=false"] if "dns.enabled" in S.BY_KEY else [])
    # Messages that all lost their Received headers: the trail's symbols are left out, as --corpus does.
    left_out = trail_sets(list(iter_message_files(args.spam)) + list(iter_message_files(args.ham)))
    try:
        config = load(args, extra_sets=sets + left_out)
        if RedisStore.from_config(config) is None:
            with private_redis() as url:
                config.values["redis.url"] = url
                return _evaluate(args, config, cleanup=False, left_out=left_out)
        config.values["redis.prefix"] = f"{config['redis.prefix']}evaluate:{os.getpid()}:"
        return _evaluate(args, config, cleanup=True, left_out=left_out)
    except RedisUnavailable as exc:
        return report(CliError(f"Redis not reachable: {exc}", status=75))
    except CliError as exc:
        return report(exc)


def _evaluate(args, config, cleanup: bool, left_out: list[str]) -> int:
    from milterguard.cli.scan import build

    store = RedisStore.from_config(config)
    assert store is not None
    bayes = Bayes(store, max_samples=max(config["ml.max_samples"], 1_000_000))
    spam = list(iter_message_files(args.spam))
    ham = list(iter_message_files(args.ham))
    try:
        t0 = time.monotonic()
        for label, paths in (("spam", spam), ("ham", ham)):
            train = select(paths, "train")
            learn_paths(bayes, config, train, label, Progress(len(train), f"learning {label}", enabled=args.progress))
        learn_time = time.monotonic() - t0
        t0 = time.monotonic()
        model = ml.train(store, alpha=args.alpha)
        train_time = time.monotonic() - t0
        engine = load_engine(args, config)
        test = [(p, 1) for p in select(spam, "test")] + [(p, 0) for p in select(ham, "test")]
        rows = score_rows(engine, test, args.progress)
    finally:
        if cleanup:
            _delete_prefix(store)
    if args.details:
        with open(args.details, "w", encoding="utf-8") as out:
            for r in rows:
                out.write(json.dumps(r) + "\n")
    labels = [r["label"] for r in rows]
    th = config["thresholds"]
    result = {
        "train": {"spam": len(select(spam, "train")), "ham": len(select(ham, "train")),
                  "learn_seconds": round(learn_time, 1), "train_seconds": round(train_time, 1), "model_samples": model.samples},
        "test": {"spam": sum(labels), "ham": len(labels) - sum(labels)},
        "scorers": {name: summarise(labels, [r[name] for r in rows])
                    for name in ("bayes", "classifier", "default_model", "rules", "without_classifier", "score")},
        "thresholds": {},
        "ms_per_message": round(sum(r["ms"] for r in rows) / max(len(rows), 1), 2),
        "learned_ms_per_message": round(sum(r["learned_ms"] for r in rows) / max(len(rows), 1), 2),
        # symbols not counted: no message has a Received header (evaluate_corpus.trail_sets)
        "not_counted": [item.split(".")[1] for item in left_out],
    }
    # The messages that decide the miss rate at low false positives: the
    # highest scoring ham and the lowest scoring spam.
    def brief(r: dict) -> dict:
        return {"path": r["path"], "score": round(r["score"], 2), "bayes": round(r["bayes"], 4),
                "classifier": round(r["classifier"], 4)}

    by_score = sorted(rows, key=lambda r: r["score"])
    result["hardest"] = {"ham": [brief(r) for r in reversed(by_score) if not r["label"]][:5],
                         "spam": [brief(r) for r in by_score if r["label"]][:5]}
    for action in ("tag", "review", "reject"):
        result["thresholds"][action] = {
            "at": th[action],
            "ham_flagged": sum(1 for r in rows if not r["label"] and r["score"] >= th[action]),
            "spam_missed": sum(1 for r in rows if r["label"] and r["score"] < th[action]),
        }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print_report(result)
    return 0


def print_report(result: dict) -> None:
    t, tr = result["test"], result["train"]
    print(f"train: {tr['spam']} spam, {tr['ham']} ham (learned in {tr['learn_seconds']}s, classifier trained in "
          f"{tr['train_seconds']}s); test: {t['spam']} spam, {t['ham']} ham")
    names = {"bayes": "Bayes alone", "classifier": "classifier alone", "default_model": "shipped model",
             "rules": "rules alone",
             "without_classifier": "rules + Bayes", "score": "full score"}
    print(f"\n{'scorer':<18} {'ROC AUC':>8} {'missed @0.1% FP':>16} {'missed @1% FP':>14}")
    for key, s in result["scorers"].items():
        print(f"{names[key]:<18} {s['auc']:>8.4f} {100 * s['miss_at_0.1pct_fp']:>15.1f}% {100 * s['miss_at_1pct_fp']:>13.1f}%")
    print(f"\n{'threshold':<10} {'score':>6} {'ham at or above':>16} {'spam below':>11}")
    for action, v in result["thresholds"].items():
        print(f"{action:<10} {v['at']:>6g} {v['ham_flagged']:>10} of {t['ham']:<4} {v['spam_missed']:>5} of {t['spam']}")
    if result["not_counted"]:
        print(f"\nno message has a Received header: {', '.join(result['not_counted'])} not counted")
    print(f"\n{result['ms_per_message']:.1f} ms per message, of which Bayes + classifier "
          f"{result['learned_ms_per_message']:.1f} ms", file=sys.stdout)


class _Env:
    ip = None
    client_name = helo = auth = ""
    mail_from = None
    rcpt: list[str] = []


def score_rows(engine, test: list[tuple[str, int]], progress: bool | None = None, transform=None) -> list[dict]:
    """Score each (path, label) of TEST with ENGINE: one row each (scores, probabilities, actions, times).

    TRANSFORM, when given, changes each message's bytes first (list headers removed, for one)."""
    from milterguard.cli.scan import build

    bar = Progress(len(test), "testing", enabled=progress)
    rows = []
    for index, (path, label) in enumerate(test):
        raw = read_message(path)
        conn, txn = build(_Env, transform(raw) if transform else raw, index)
        txn.started = time.monotonic()
        t1 = time.perf_counter()
        verdict = engine.evaluate(conn, txn)
        elapsed = time.perf_counter() - t1
        learned = sum(txn.timings.get(name, 0.0) for name in ("bayes", "classifier", "shipped_model"))
        facts = txn.facts
        rows.append({
            "path": path, "label": label, "score": verdict.score, "action": verdict.action.name.lower(),
            "bayes": facts.bayes.probability if facts.bayes else 0.5,
            "classifier": facts.classifier.probability if facts.classifier else 0.5,
            "default_model": facts.default_classifier.probability if facts.default_classifier else 0.5,
            "without_classifier": verdict.score - _learned_weight(verdict, LEARNED_GROUPS["classifier"]),
            "rules": verdict.score - _learned_weight(verdict, LEARNED_GROUPS["bayes"] + LEARNED_GROUPS["classifier"]),
            "ms": elapsed * 1000, "learned_ms": learned * 1000,
        })
        bar.step()
    return rows


def _delete_prefix(store: RedisStore) -> None:
    writer = store.writer()
    cursor = 0
    while True:
        cursor, keys = writer.scan(cursor, match=store.prefix + "*", count=1000)
        if keys:
            writer.delete(*keys)
        if cursor == 0:
            break
