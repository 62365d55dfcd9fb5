"""Fit the weights of the rules and of the shipped model on the train split; write a weight file.

    python bench/combine_weights.py --corpus ../shared/corpus --output rules/weights/learned.yaml

Not a test: run it after the rules, the tokens or the shipped model change
(after `milterguard train --corpus ... --output milterguard/data/default-model.bin`),
and commit the file it writes.  Only the train split is read (the fixed split of
`milterguard.corpus`); docs/accuracy.md gives the held-out figures.

1. Every train message is scored by the engine with DNS, Bayes, the site's
   classifier, the shipped model and the weight files off: the hits of the
   rules alone, each with its factor.
2. The shipped model's probability of each train message comes from a model
   fitted on the other four of five folds (out of fold, as it would be on
   mail it never saw), turned into the ML_DEFAULT_SPAM / ML_DEFAULT_HAM
   factors as the check does.
3. A logistic regression on those factors, class-balanced, with an L2
   penalty, fits one weight for each symbol that hits at least `MIN_HITS`
   train messages (the rest enter the fit together, at their rule files'
   weights, and keep those weights: the corpus says too little of them, and
   some, such as DMARC's policies, are decisions the docs promise).  The
   symbols of the groups in `KEPT_GROUPS` (lures, phishing) are not fitted
   either: they are there for the campaigns the shipped model has not seen,
   and on the train split, whose campaigns the model learned, a fit would
   trade them away for the model.  Each weight keeps
   the sign its rule file gives it (a spam sign never turns into a ham
   sign), and symbols the rule files weigh 0 stay 0: interpretable, no
   black box.
4. The fitted margin is scaled into score points so that the review
   threshold (6) sits where at most `REVIEW_FP` of the (out of fold) train
   ham reach; tag (4) and reject (15) keep their ratios to it.

The file lists every weighted symbol with its new weight; the learned
classifiers of a site (BAYES_*, ML_SPAM, ML_HAM) keep their rule files'
weights.  Same corpus, same rules, same file.
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
FIXED = ("BAYES_", "ML_SPAM", "ML_HAM", "ML_TEMPFAIL")  # the site's learned symbols: not fitted here
KEPT_GROUPS = ("lures", "phishing")  # rules for what the model has not seen: their own weights


def factors(p: float, spam_at: float = 0.6, ham_at: float = 0.4) -> tuple[float, float]:
    """(ML_DEFAULT_SPAM factor, ML_DEFAULT_HAM factor) for probability P, as checks/shipped_model.py makes them."""
    if p >= spam_at:
        return (p - 0.5) / 0.5, 0.0
    if p <= ham_at:
        return 0.0, (0.5 - p) / 0.5
    return 0.0, 0.0


def rule_hits(paths: list[str], progress: bool) -> tuple[list[dict[str, float]], dict[str, float], set[str]]:
    """Per message {symbol: factor} of the rules alone, the declared weight of every symbol, and
    the symbols of KEPT_GROUPS."""
    from milterguard import settings as S
    from milterguard.cli.common import load, load_engine
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

    class _Env:
        ip = None
        client_name = helo = auth = ""
        mail_from = None
        rcpt: list[str] = []

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


def out_of_fold(samples, hashes) -> list[float]:
    """The shipped model's probability of each sample, from a model fitted without its fold."""
    from sklearn.model_selection import StratifiedKFold

    from milterguard.cli.shipped import fit_samples

    probs = [0.0] * len(samples)
    labels = [s.label for s in samples]
    for train_idx, test_idx in StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels):
        model = fit_samples([samples[i] for i in train_idx], hashes)
        for i in test_idx:
            probs[i] = model.probability(hashes[samples[i].path])
    return probs


def fit(x: np.ndarray, y: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression with sign bounds: (weights, intercept)."""
    from scipy.optimize import minimize

    sw = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    n = len(y)

    def loss(theta):
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        # log(1 + exp(-t z)) with t = +-1, stably
        t = np.where(y == 1, 1.0, -1.0)
        m = -t * z
        lv = np.logaddexp(0.0, m)
        g = sw * (1.0 / (1.0 + np.exp(-m))) * -t
        f = (sw * lv).sum() / n + L2 * (w ** 2).sum() / n
        grad = np.append(x.T @ g / n + 2 * L2 * w / n, g.sum() / n)
        return f, grad

    bounds = [(0, None) if s > 0 else (None, 0) for s in signs] + [(None, None)]
    res = minimize(loss, np.append(np.abs(signs) * 0.0, 0.0), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 5000})
    return res.x[:-1], float(res.x[-1])


def main(argv: list[str] | None = None) -> int:
    from milterguard.cli import shipped
    from milterguard.corpus import split_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="the corpus directory (spam/, ham/, hard_ham/ below it)")
    parser.add_argument("--output", required=True, help="the weight file to write")
    parser.add_argument("--cache", help="keep the scored train split in this file (for trying changes)")
    parser.add_argument("--progress", action="store_true", default=None)
    args = parser.parse_args(argv)

    if args.cache and os.path.exists(args.cache):
        with open(args.cache, "rb") as f:
            samples, probs, hits, declared, kept = pickle.load(f)
    else:
        all_samples, hashes = shipped.load_corpus(args.corpus, args.progress)
        samples = [s for s in all_samples if split_of(s.path) == "train"]
        probs = out_of_fold(samples, hashes)
        hits, declared, kept = rule_hits([s.path for s in samples], args.progress)
        if args.cache:
            with open(args.cache, "wb") as f:
                pickle.dump((samples, probs, hits, declared, kept), f)

    y = np.asarray([s.label for s in samples])
    counts: dict[str, int] = {}
    for row in hits:
        for sym in row:
            counts[sym] = counts.get(sym, 0) + 1
    fitted = sorted(s for s, c in counts.items()
                    if c >= MIN_HITS and declared.get(s) and not s.startswith(FIXED) and s not in kept)
    col = {s: i for i, s in enumerate(fitted)}
    names = fitted + ["ML_DEFAULT_SPAM", "ML_DEFAULT_HAM", "(other rules)"]
    x = np.zeros((len(samples), len(names)))
    for r, row in enumerate(hits):
        for sym, f in row.items():
            if sym in col:
                x[r, col[sym]] = f
            elif not sym.startswith(FIXED):
                x[r, -1] += declared[sym] * f
        x[r, -3], x[r, -2] = factors(probs[r])
    signs = np.asarray([np.sign(declared[s]) for s in fitted] + [1.0, -1.0, 1.0])
    w, b = fit(x, y, signs)
    margin = x @ w
    ham = np.sort(margin[y == 0])
    cut = ham[int(np.ceil(len(ham) * (1 - REVIEW_FP))) - 1]
    scale = 6.0 / cut
    weights = {name: round(float(scale * wi), 2) for name, wi in zip(names, w)}
    # The rarely hit symbols keep their rule files' weights: score as the file will.
    score = scale * (margin - x[:, -1] * w[-1]) + x[:, -1]
    th = {"tag": 4.0, "review": 6.0, "reject": 15.0}
    lines = [
        "# Weights fitted on the train split of the shared corpus by bench/combine_weights.py",
        "# (see docs/accuracy.md). Regenerate, do not edit: put changes in local.d `symbols:`.",
        f"# {int(y.sum())} spam and {int(len(y) - y.sum())} ham; review (6) at the score reached by "
        f"{REVIEW_FP:.2%} of that ham (out of fold).",
        "# On those messages: " + ", ".join(
            f"{a} {int(((score >= t) & (y == 0)).sum())} ham, {int(((score < t) & (y == 1)).sum())} spam below"
            for a, t in th.items()) + ".",
        f"# Not listed, so keeping their rule files' weights: symbols hitting fewer than {MIN_HITS} of them, "
        f"and those of the groups {', '.join(KEPT_GROUPS)}.",
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
