"""`milterguard evaluate --corpus DIR`: every corpus under DIR, out of the box and trained, and a time split.

A corpus is a sub-directory of DIR with `spam/` and `ham/` (and perhaps
`hard_ham/`) directories, e.g. `spamassassin/` and `modern/`.  For each:

- **out of the box**: no Redis, nothing learned, DNS off: the rules and the
  shipped model (`ml.default_model`) score the test split;
- **trained**: the corpus's train split is learned into a Redis of our own
  (Bayes and the site's classifier, as `evaluate --spam --ham` does), then
  the test split is scored; the shipped model fades as the site's model
  grows (`ml.default_fade`).

Ham that came through a mailing list is also scored with its list headers
removed (`strip_list_headers`), a stand-in for personal mail.  A corpus none
of whose messages has a Received header lost its trail when it was
collected: the symbols that read the trail (`TRAIL_SYMBOLS`) are not counted
on it, since real mail reaches the filter with the Received headers of the
sending side, and their absence there tells how the corpus was cleaned, not
spam from ham.  The time
split (`--time-split NAME`, default `modern`) tests the newest quarter of
that corpus by Date header (per class) on what was learned from the older
three quarters: out of the box with a model built as the shipped one is
but without that newest quarter, and trained on the older three quarters.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from milterguard.cli import shipped
from milterguard.cli.common import CliError, load, load_engine
from milterguard.cli.evaluate import private_redis, score_rows, summarise, _delete_prefix
from milterguard.cli.learn import learn_paths
from milterguard.clients.redis_client import RedisStore
from milterguard.corpus import Progress, select
from milterguard.stores import models as ml
from milterguard.stores.bayes import Bayes

OFFLINE = ["bayes.autolearn=false", "dns.enabled=false"]
TRAIL_SYMBOLS = ("RCVD_NONE",)  # not counted on a corpus whose messages all lost their Received headers
# Headers a list manager adds or rewrites; removed to make list mail look like personal mail.
_LIST_HEADER = re.compile(rb"^(list-[\w-]+|x-beenthere|x-mailman-[\w-]+|x-mailing-list|mailing-list|precedence|"
                          rb"errors-to|x-list[\w-]*|delivered-to)\s*:", re.I)
_LIST_ADDRESS = re.compile(rb"^(sender|return-path)\s*:.*(-bounces|-request|-owner|owner-|bounce)", re.I)


def strip_list_headers(raw: bytes) -> bytes:
    """RAW without the header fields a list manager adds (List-*, X-BeenThere, X-Mailman-*, Precedence,
    Errors-To, Mailing-List) and without a Sender or Return-Path naming the list's bounce address."""
    end = raw.find(b"\n\n")
    head, body = (raw, b"") if end < 0 else (raw[:end + 1], raw[end + 1:])
    out: list[bytes] = []
    skipping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = bool(_LIST_HEADER.match(line) or _LIST_ADDRESS.match(line))
        if not skipping:
            out.append(line)
    return b"".join(out) + body


def has_trail(paths: list[str]) -> bool:
    """Whether any message of PATHS has a Received header (a corpus cleaned of them has none)."""
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(65536).split(b"\n\n", 1)[0]
        if re.search(rb"^received\s*:", head, re.I | re.M):
            return True
    return False


def trail_sets(paths: list[str]) -> list[str]:
    """The settings that leave out TRAIL_SYMBOLS when no message of PATHS has a Received header."""
    return [] if has_trail(paths) else [f"symbols.{sym}.enabled=false" for sym in TRAIL_SYMBOLS]


def is_list_mail(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(65536).split(b"\n\n", 1)[0]
    return re.search(rb"^list-id\s*:", head, re.I | re.M) is not None


def sources(root: str) -> dict[str, tuple[list[str], list[str]]]:
    """{corpus name: (spam paths, ham paths)} of ROOT's sub-directories."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for s in shipped.corpus_samples(root):
        spam, ham = found.setdefault(s.source, ([], []))
        (spam if s.label else ham).append(s.path)
    return {k: v for k, v in sorted(found.items()) if v[0] and v[1]}


def outcome(name: str, setting: str, rows: list[dict], extra: list[str] | None = None) -> dict:
    """The figures of one run: ranking, and what the default thresholds did to spam and ham."""
    labels = [r["label"] for r in rows]
    spam = [r for r in rows if r["label"]]
    ham = [r for r in rows if not r["label"]]
    held = ("review", "discard", "reject")
    result = {"corpus": name, "setting": setting, "spam": len(spam), "ham": len(ham),
              "spam_held": sum(r["action"] in held for r in spam),
              "spam_tagged": sum(r["action"] == "tag" for r in spam),
              "ham_tagged": sum(r["action"] == "tag" for r in ham),
              "ham_held": sum(r["action"] in held for r in ham),
              "ham_rejected": sum(r["action"] == "reject" for r in ham),
              "ms_median": round(sorted(r["ms"] for r in rows)[len(rows) // 2], 2) if rows else 0.0,
              "not_counted": [item.split(".")[1] for item in extra or [] if item.startswith("symbols.")]}
    if len(set(labels)) == 2:
        result.update(summarise(labels, [r["score"] for r in rows]))
    return result


@contextmanager
def trained_config(args, extra: list[str] | None = None) -> Iterator:
    """A configuration with a Redis of its own, emptied at the end."""
    config = load(args, extra_sets=OFFLINE + (extra or []))
    if RedisStore.from_config(config) is None:
        with private_redis() as url:
            config.values["redis.url"] = url
            yield config
            _delete_prefix(RedisStore.from_config(config))
        return
    config.values["redis.prefix"] = f"{config['redis.prefix']}evaluate:{os.getpid()}:{time.monotonic_ns()}:"
    try:
        yield config
    finally:
        _delete_prefix(RedisStore.from_config(config))


def run_trained(args, name: str, train: tuple[list[str], list[str]], test: list[tuple[str, int]],
                list_ham: set[str], extra: list[str] | None = None) -> list[dict]:
    with trained_config(args, extra) as config:
        store = RedisStore.from_config(config)
        bayes = Bayes(store, max_samples=max(config["ml.max_samples"], 1_000_000))
        for label, paths in (("spam", train[0]), ("ham", train[1])):
            learn_paths(bayes, config, paths, label, Progress(len(paths), f"{name}: learning {label}", enabled=args.progress))
        ml.train(store)
        engine = load_engine(args, config)
        return _both(args, name, "trained", engine, test, list_ham, extra)


def _both(args, name: str, setting: str, engine, test, list_ham: set[str],
          extra: list[str] | None = None) -> list[dict]:
    rows = score_rows(engine, test, args.progress)
    out = [outcome(name, setting, rows, extra)]
    if list_ham:
        stripped = {r["path"]: r for r in score_rows(engine, [(p, 0) for p in sorted(list_ham)], args.progress,
                                                     transform=strip_list_headers)}
        out.append(outcome(name, setting + ", ham without list headers", [stripped.get(r["path"], r) for r in rows],
                           extra))
    return out


def run_out_of_box(args, name: str, test, list_ham: set[str], model: str | None = None,
                   extra: list[str] | None = None) -> list[dict]:
    config = load(args, extra_sets=OFFLINE + (extra or []))
    for key in ("redis.url", "redis.replicas", "redis.sentinels"):
        config.values[key] = "" if key == "redis.url" else []
    if model:
        config.values["ml.default_model"] = model
    engine = load_engine(args, config)
    return _both(args, name, "out of the box", engine, test, list_ham, extra)


def run_corpus(args) -> int:
    root = args.corpus
    found = sources(root)
    if not found:
        raise CliError(f"{root}: no sub-directory with spam/ and ham/ messages")
    results: list[dict] = []
    for name, (spam, ham) in found.items():
        test = [(p, 1) for p in select(spam, "test")] + [(p, 0) for p in select(ham, "test")]
        list_ham = {p for p, label in test if not label and is_list_mail(p)}
        extra = trail_sets(spam + ham)
        results += run_out_of_box(args, name, test, list_ham, extra=extra)
        results += run_trained(args, name, (select(spam, "train"), select(ham, "train")), test, list_ham, extra)
    if args.time_split in found:
        results += time_split(args, root, args.time_split, found[args.time_split])
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return 0


def time_split(args, root: str, name: str, paths: tuple[list[str], list[str]]) -> list[dict]:
    """Out of the box and trained on all but the newest quarter of corpus NAME (per class), tested on it."""
    samples, hashes = shipped.load_corpus(root, args.progress)
    newest: set[str] = set()
    for label in (0, 1):
        newest |= shipped.newest_quarter([s for s in samples if s.source == name and s.label == label])
    label_name = f"{name}, newest quarter by Date"
    test = [(p, 1) for p in paths[0] if p in newest] + [(p, 0) for p in paths[1] if p in newest]
    list_ham = {p for p, label in test if not label and is_list_mail(p)}
    # The shipped model's recipe, without the newest quarter: the other corpora's train split and the
    # older three quarters of this one.
    chosen = [s for s in samples if (s.source == name and s.path not in newest)
              or (s.source != name and select([s.path], "train"))]
    with tempfile.TemporaryDirectory(prefix="milterguard-evaluate-") as tmp:
        model_path = os.path.join(tmp, "model.bin")
        shipped.linear.write_model(model_path, shipped.fit_samples(chosen, hashes), {"split": "time"})
        extra = trail_sets(paths[0] + paths[1])
        out = run_out_of_box(args, label_name, test, list_ham, model=model_path, extra=extra)
    older = ([p for p in paths[0] if p not in newest], [p for p in paths[1] if p not in newest])
    return out + run_trained(args, label_name, older, test, list_ham, extra)


def print_table(results: list[dict]) -> None:
    print(f"{'corpus / setting':<72} {'spam':>5} {'ham':>5} {'AUC':>7} {'miss@0.1%':>9} "
          f"{'spam held':>9} {'+tagged':>7} {'ham tag':>7} {'held':>4} {'rej':>3}")
    for r in results:
        label = f"{r['corpus']}: {r['setting']}"
        auc = f"{r['auc']:.4f}" if "auc" in r else "-"
        miss = f"{100 * r['miss_at_0.1pct_fp']:.1f}%" if "auc" in r else "-"
        held = f"{100 * r['spam_held'] / max(r['spam'], 1):.1f}%"
        tagged = f"{100 * (r['spam_held'] + r['spam_tagged']) / max(r['spam'], 1):.1f}%"
        print(f"{label:<72} {r['spam']:>5} {r['ham']:>5} {auc:>7} {miss:>9} {held:>9} {tagged:>7} "
              f"{r['ham_tagged']:>7} {r['ham_held']:>4} {r['ham_rejected']:>3}")
    notes = {r["corpus"].split(",")[0]: r["not_counted"] for r in results if r.get("not_counted")}
    for name, symbols in notes.items():
        print(f"{name}: no message has a Received header (removed when the corpus was collected): "
              f"{', '.join(symbols)} not counted")
