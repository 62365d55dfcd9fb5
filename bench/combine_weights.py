"""Fit the weights of the rules, the shipped model and the site's classifiers on the train split; write a weight file.

    python bench/combine_weights.py --corpus ../shared/corpus --output rules/weights/learned.yaml

Not a test: run it after the rules, the tokens or the shipped model change
(after `milterguard train --corpus ... --output milterguard/data/default-model.bin`),
and commit the file it writes.  Only the train split is read (the fixed split of
`milterguard.corpus`); docs/accuracy.md gives the held-out figures.  It needs
redis-server (started on loopback, no persistence, stopped at the end).

1. Every train message is scored by the engine with DNS, Bayes, the site's
   classifier, the shipped model and the weight files off: the hits of the
   rules alone, each with its factor.
2. The train split is cut into five folds (stratified, fixed seed).  The
   shipped model's probability of each message comes from a model fitted on
   the other four folds, turned into the ML_DEFAULT_SPAM / ML_DEFAULT_HAM
   factors as the check does.
3. As a site that learned its own mail: for each fold and each corpus, the
   other four folds of that corpus are learned into Redis (Bayes and the
   site's classifier, as `milterguard learn` and `train` do) and the fold is
   scored: the factors of BAYES_SPAM / BAYES_HAM / ML_SPAM / ML_HAM and the
   number of messages the site's model learned, by which the shipped model
   fades (`ml.default_fade`).
4. Every message enters the fit twice: as on day one (rules and the shipped
   model) and as trained (the same, the shipped model faded, and the site's
   classifiers), each setting class-balanced and weighed alike, so that one
   set of weights serves both.  A logistic regression with an L2 penalty
   fits one weight for each symbol that hits at least `MIN_HITS` train
   messages, for the shipped model's and the site's symbols, and one factor
   for all rarer symbols together (they keep their rule files' weights: the
   corpus says too little of them, and some, such as DMARC's policies, are
   decisions the docs promise).  The symbols of the groups in `KEPT_GROUPS`
   (lures, phishing) are not fitted either: they are there for the
   campaigns the shipped model has not seen, and on the train split, whose
   campaigns the model learned, a fit would trade them away for the model.
   The symbols in `UNMEASURED` are left out of the fit and keep their rule
   files' weights: the corpus lost what they look at (its Received headers
   were removed, from every message of `modern/` and from some SpamAssassin
   ham, so their absence tells the corpora apart, not spam from ham).  Each
   weight keeps the sign its rule file gives it (a spam sign never turns
   into a ham sign), and symbols the rule files weigh 0 stay 0:
   interpretable, no black box.
5. `ml.default_fade` is chosen among `FADES` by cross-validating that fit
   over the same folds (fit on four, score the fifth): the fade with the
   fewest trained spam missed at 0.1 % false positives, mean over the
   corpora.  The script prints the table; the setting's default must match
   the fade named in the file (tests/test_shipped_model.py checks).
6. The fitted margin is scaled into score points so that the review
   threshold (6) sits where at most `REVIEW_FP` of the (out of fold) train
   ham reach, on day one and trained alike; tag (4) and reject (15) keep
   their ratios to it.

The file lists every weighted symbol with its new weight.  Same corpus, same
rules, same file.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIN_HITS = 10
REVIEW_FP = 0.0005  # share of train ham at or above the review threshold (half the aim of 0.1 %)
L2 = 1.0  # penalty on the squared weights (in logit units), against the sum of sample weights
FOLDS = 5
FIXED = ("BAYES_TEMPFAIL", "ML_TEMPFAIL")  # Redis outages: say nothing of the message, not fitted
SITE = ("BAYES_SPAM", "BAYES_HAM", "ML_SPAM", "ML_HAM")  # the site's classifiers, fitted on the trained rows
KEPT_GROUPS = ("lures", "phishing")  # rules for what the model has not seen: their own weights
UNMEASURED = ("RCVD_NONE",)  # what the corpus lost (its Received headers): out of the fit, their own weights
FADES = (2000, 5000, 10000, 20000, 0)  # candidates for ml.default_fade (0: the shipped model never fades)


def factors(p: float, spam_at: float = 0.6, ham_at: float = 0.4) -> tuple[float, float]:
    """(ML_DEFAULT_SPAM factor, ML_DEFAULT_HAM factor) for probability P, as checks/shipped_model.py makes them."""
    if p >= spam_at:
        return (p - 0.5) / 0.5, 0.0
    if p <= ham_at:
        return 0.0, (0.5 - p) / 0.5
    return 0.0, 0.0


def share(samples_learned: int, fade: int) -> float:
    """The shipped model's share of its weight beside a site model of SAMPLES_LEARNED (checks/shipped_model.fade)."""
    return 1.0 if not fade else max(0.0, 1.0 - samples_learned / fade)


def rule_hits(paths: list[str], progress: bool) -> tuple[list[dict[str, float]], dict[str, float], set[str]]:
    """Per message {symbol: factor} of the rules alone, the declared weight of every symbol, and
    the symbols of KEPT_GROUPS."""
    from milterguard import settings as S
    from milterguard.cli.common import load, load_engine
    from milterguard.cli.evaluate import _Env
    from milterguard.cli.scan import build
    from milterguard.corpus import Progress
    from milterguard.mail.raw import read_message

    sets = ["bayes.enabled=false", "ml.enabled=false", "bayes.autolearn=false", "rules.weights=[]",
            "ml.default_model=", "redis.url="]
    sets += ["dns.enabled=false"] if "dns.enabled" in S.BY_KEY else []
    cfg_args = argparse.Namespace(etc_dir=None, config=[], sets=sets)
    config = load(cfg_args)
    engine = load_engine(cfg_args, config)
    declared = {s: r.weight for s, r in engine.ruleset.rules.items() if r.enabled}
    kept = {s for s, r in engine.ruleset.rules.items() if r.group in KEPT_GROUPS}

    out = []
    bar = Progress(len(paths), "scoring", enabled=progress)
    for index, path in enumerate(paths):
        conn, txn = build(_Env, read_message(path), index)
        txn.started = time.monotonic()
        verdict = engine.evaluate(conn, txn)
        row = {}
        for h in verdict.hits:
            w = declared.get(h.symbol, 0.0)
            if w:
                row[h.symbol] = row.get(h.symbol, 0.0) + h.base_weight / w
        out.append(row)
        bar.step()
    return out, declared, kept


def fold_of(samples) -> list[int]:
    """The fold (0 to FOLDS-1) of each sample: stratified by label, fixed seed."""
    from sklearn.model_selection import StratifiedKFold

    labels = [s.label for s in samples]
    fold = [0] * len(samples)
    splits = StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels)
    for k, (_, test_idx) in enumerate(splits):
        for i in test_idx:
            fold[i] = k
    return fold


def out_of_fold(samples, hashes, fold: list[int]) -> list[float]:
    """The shipped model's probability of each sample, from a model fitted without its fold."""
    from milterguard.cli.shipped import fit_samples

    probs = [0.0] * len(samples)
    for k in range(FOLDS):
        model = fit_samples([s for s, f in zip(samples, fold) if f != k], hashes)
        for i, s in enumerate(samples):
            if fold[i] == k:
                probs[i] = model.probability(hashes[s.path])
    return probs


def site_rows(samples, fold: list[int], progress: bool) -> list[tuple[dict[str, float], int]]:
    """Per sample ({site symbol: factor}, messages the site's model learned), from a site that learned the
    other folds of the sample's corpus into a Redis of our own (redis-server on loopback)."""
    from milterguard.cli.common import load, load_engine
    from milterguard.cli.evaluate import _Env, _delete_prefix, private_redis
    from milterguard.cli.learn import learn_paths
    from milterguard.cli.scan import build
    from milterguard.clients.redis_client import RedisStore
    from milterguard.corpus import Progress
    from milterguard.mail.raw import read_message
    from milterguard.stores import models as ml
    from milterguard.stores.bayes import Bayes

    out: list[tuple[dict[str, float], int]] = [({}, 0)] * len(samples)
    sources = sorted({s.source for s in samples})
    with private_redis() as url:
        for k in range(FOLDS):
            for source in sources:
                sets = ["bayes.autolearn=false", "rules.weights=[]", "ml.default_model=", "dns.enabled=false",
                        f"redis.url={url}", f"redis.prefix=combine:{k}:{source}:"]
                cfg_args = argparse.Namespace(etc_dir=None, config=[], sets=sets)
                config = load(cfg_args)
                store = RedisStore.from_config(config)
                bayes = Bayes(store, max_samples=max(config["ml.max_samples"], 1_000_000))
                mine = [i for i, s in enumerate(samples) if s.source == source]
                for label, name in ((1, "spam"), (0, "ham")):
                    paths = [samples[i].path for i in mine if fold[i] != k and samples[i].label == label]
                    learn_paths(bayes, config, paths, name,
                                Progress(len(paths), f"fold {k} {source}: learning {name}", enabled=progress))
                ml.train(store)
                engine = load_engine(cfg_args, config)
                declared = {s: r.weight for s, r in engine.ruleset.rules.items() if s in SITE}
                test = [i for i in mine if fold[i] == k]
                bar = Progress(len(test), f"fold {k} {source}: scoring", enabled=progress)
                for i in test:
                    conn, txn = build(_Env, read_message(samples[i].path), i)
                    txn.started = time.monotonic()
                    verdict = engine.evaluate(conn, txn)
                    row = {h.symbol: h.base_weight / declared[h.symbol] for h in verdict.hits
                           if h.symbol in declared and declared[h.symbol]}
                    site = txn.facts.classifier
                    out[i] = (row, int(site.detail.get("samples", 0)) if site is not None else 0)
                    bar.step()
                _delete_prefix(store)
    return out


def fit(x: np.ndarray, y: np.ndarray, signs: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, float]:
    """Logistic regression with sample weights SW and sign bounds: (weights, intercept)."""
    from scipy.optimize import minimize

    n = sw.sum()
    t = np.where(y == 1, 1.0, -1.0)

    def loss(theta):
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        # log(1 + exp(-t z)), stably
        m = -t * z
        lv = np.logaddexp(0.0, m)
        g = sw * (1.0 / (1.0 + np.exp(-m))) * -t
        f = (sw * lv).sum() / n + L2 * (w ** 2).sum() / n
        grad = np.append(x.T @ g / n + 2 * L2 * w / n, g.sum() / n)
        return f, grad

    bounds = [(0, None) if s > 0 else (None, 0) for s in signs] + [(None, None)]
    res = minimize(loss, np.zeros(len(signs) + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 5000})
    return res.x[:-1], float(res.x[-1])


def balanced(y: np.ndarray, setting: np.ndarray) -> np.ndarray:
    """Sample weights: in each setting, spam and ham weigh alike; the settings weigh alike."""
    sw = np.zeros(len(y))
    for s in np.unique(setting):
        part = setting == s
        ys = y[part]
        sw[part] = np.where(ys == 1, 0.5 / ys.mean(), 0.5 / (1 - ys.mean()))
    return sw


def miss_at(y: np.ndarray, score: np.ndarray, fp: float = 0.001) -> float:
    from milterguard.cli.evaluate import miss_at_fp

    return miss_at_fp(list(y), list(score), fp)


def main(argv: list[str] | None = None) -> int:
    from milterguard.cli import shipped
    from milterguard.corpus import split_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="the corpus directory (spam/, ham/, hard_ham/ below it)")
    parser.add_argument("--output", required=True, help="the weight file to write")
    parser.add_argument("--cache", help="keep the scored train split in this file (for trying changes)")
    parser.add_argument("--fade", type=int, help="fit for this ml.default_fade instead of choosing among FADES")
    parser.add_argument("--progress", action="store_true", default=None)
    args = parser.parse_args(argv)

    cached: tuple = ()
    if args.cache and os.path.exists(args.cache):
        with open(args.cache, "rb") as f:
            cached = pickle.load(f)
    if len(cached) == 7:
        samples, probs, hits, declared, kept, fold, site = cached
    elif len(cached) == 5:  # a cache of the day-one rows alone (same folds): add the trained ones
        samples, probs, hits, declared, kept = cached
        fold = fold_of(samples)
        site = site_rows(samples, fold, args.progress)
        with open(args.cache, "wb") as f:
            pickle.dump((samples, probs, hits, declared, kept, fold, site), f)
    else:
        all_samples, hashes = shipped.load_corpus(args.corpus, args.progress)
        samples = [s for s in all_samples if split_of(s.path) == "train"]
        fold = fold_of(samples)
        probs = out_of_fold(samples, hashes, fold)
        hits, declared, kept = rule_hits([s.path for s in samples], args.progress)
        site = site_rows(samples, fold, args.progress)
        if args.cache:
            with open(args.cache, "wb") as f:
                pickle.dump((samples, probs, hits, declared, kept, fold, site), f)

    n = len(samples)
    y1 = np.asarray([s.label for s in samples])
    fold1 = np.asarray(fold)
    source1 = np.asarray([s.source for s in samples])
    hits = [{sym: f for sym, f in row.items() if sym not in UNMEASURED} for row in hits]
    counts: dict[str, int] = {}
    for row in hits + [r for r, _ in site]:
        for sym in row:
            counts[sym] = counts.get(sym, 0) + 1
    fitted = sorted(s for s, c in counts.items()
                    if c >= MIN_HITS and declared.get(s) and not s.startswith(FIXED) and s not in kept
                    and s not in SITE)
    names = fitted + ["ML_DEFAULT_SPAM", "ML_DEFAULT_HAM"] + list(SITE) + ["(other rules)"]
    col = {s: i for i, s in enumerate(names)}
    base = np.zeros((n, len(names)))
    for r, row in enumerate(hits):
        for sym, f in row.items():
            if sym in col:
                base[r, col[sym]] = f
            elif not sym.startswith(FIXED):
                base[r, -1] += declared[sym] * f
    shipped_f = np.asarray([factors(p) for p in probs])
    learned_n = np.asarray([m for _, m in site])
    site_x = np.zeros((n, len(SITE)))
    for r, (row, _) in enumerate(site):
        for j, sym in enumerate(SITE):
            site_x[r, j] = row.get(sym, 0.0)

    y = np.concatenate([y1, y1])
    setting = np.concatenate([np.zeros(n), np.ones(n)])
    fold2 = np.concatenate([fold1, fold1])
    source2 = np.concatenate([source1, source1])
    sw = balanced(y, setting)
    signs = np.asarray([np.sign(declared[s]) for s in fitted] + [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    i_default = col["ML_DEFAULT_SPAM"]
    i_site = col[SITE[0]]

    def design(fade: int) -> np.ndarray:
        day, trained = base.copy(), base.copy()
        day[:, i_default:i_default + 2] = shipped_f
        shares = np.asarray([share(m, fade) for m in learned_n])
        trained[:, i_default:i_default + 2] = shipped_f * shares[:, None]
        trained[:, i_site:i_site + len(SITE)] = site_x
        return np.vstack([day, trained])

    # ml.default_fade by cross-validating the fit over the folds.
    print(f"{'ml.default_fade':>15}  " + "  ".join(f"{src + ' ' + st:>22}" for st in ("day one", "trained")
                                                  for src in sorted(set(source1))) + "   (spam missed at 0.1% FP, AUC)")
    from sklearn.metrics import roc_auc_score

    table = {}
    for fade in ([args.fade] if args.fade is not None else FADES):
        x = design(fade)
        oof = np.zeros(len(y))
        for k in range(FOLDS):
            w, b = fit(x[fold2 != k], y[fold2 != k], signs, sw[fold2 != k])
            oof[fold2 == k] = x[fold2 == k] @ w
        cells, trained_miss = [], []
        for st in (0, 1):
            for src in sorted(set(source1)):
                part = (setting == st) & (source2 == src)
                m = miss_at(y[part], oof[part])
                cells.append(f"{100 * m:5.1f}% {roc_auc_score(y[part], oof[part]):.4f}")
                if st == 1:
                    trained_miss.append(m)
        table[fade] = float(np.mean(trained_miss))
        print(f"{fade:>15}  " + "  ".join(f"{c:>22}" for c in cells))
    fade = min(table, key=lambda f: (round(table[f], 6), FADES.index(f) if f in FADES else 0))
    print(f"chosen ml.default_fade: {fade}")

    x = design(fade)
    w, b = fit(x, y, signs, sw)
    margin = x @ w
    cuts = []
    for st in (0, 1):
        ham = np.sort(margin[(y == 0) & (setting == st)])
        cuts.append(ham[int(np.ceil(len(ham) * (1 - REVIEW_FP))) - 1])
    scale = 6.0 / max(cuts)
    weights = {name: round(float(scale * wi), 2) for name, wi in zip(names, w)}
    # The rarely hit symbols keep their rule files' weights: score as the file will.
    score = scale * (margin - x[:, -1] * w[-1]) + x[:, -1]
    th = {"tag": 4.0, "review": 6.0, "reject": 15.0}

    def outcome(st: int) -> str:
        part = setting == st
        return ", ".join(f"{a} {int(((score >= t) & (y == 0) & part).sum())} ham, "
                         f"{int(((score < t) & (y == 1) & part).sum())} spam below" for a, t in th.items())

    lines = [
        "# Weights fitted on the train split of the shared corpus by bench/combine_weights.py",
        "# (see docs/accuracy.md). Regenerate, do not edit: put changes in local.d `symbols:`.",
        f"# {int(y1.sum())} spam and {int(n - y1.sum())} ham, each on day one and as trained (its corpus's other "
        f"folds learned); review (6) at the score reached by {REVIEW_FP:.2%} of that ham (out of fold).",
        f"# Fitted for ml.default_fade: {fade}",
        "# Day one: " + outcome(0) + ".",
        "# Trained: " + outcome(1) + ".",
        f"# Not listed, so keeping their rule files' weights: symbols hitting fewer than {MIN_HITS} of them, "
        f"those of the groups {', '.join(KEPT_GROUPS)}, and {', '.join(UNMEASURED)} (the corpus lost its "
        "Received headers).",
    ]
    out = {}
    for sym in sorted(declared):
        if sym.startswith(FIXED) or not declared[sym]:
            continue
        if sym in weights:
            out[sym] = weights[sym]
    text = "\n".join(lines) + "\n" + "".join(f"{sym}: {out[sym]:g}\n" for sym in sorted(out))
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print("\n".join(lines))
    for name in names[:-1]:
        print(f"  {name:<28} {declared.get(name, 0):>6g} -> {weights[name]:g}  ({counts.get(name, 0)} hits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
