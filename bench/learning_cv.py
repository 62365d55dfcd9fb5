"""Cross-validation of Bayes, the classifier and the full score on the train split only.

Not a test: run it by hand before changing the tokens, the classifier or the
weights of the BAYES_* / ML_* symbols, and compare with docs/accuracy.md.

    python bench/learning_cv.py --spam C/spam --ham C/ham --ham C/hard_ham [--repeats 3]

Only the train split of `milterguard.corpus` is read.  Each message is
scored once by the engine with Bayes, the classifier and DNS off (its rule
score) and tokenized as the checks tokenize it.  For each fold of
StratifiedKFold(5, shuffle=True, random_state=R), R = 0 .. repeats-1, Bayes
is counted in memory from the other folds and combined as
`milterguard.stores.bayes.combine` does, the classifier is fitted on them by
`milterguard.stores.models.fit`, and the full score is the rule score plus the
learned symbols' weights (from the rule files) scaled as the checks scale
them.  Printed: mean over the folds of ROC AUC and of the spam missed at
0.1 % and 1 % false positives, for Bayes, the classifier and the full score.
No Redis is needed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _emit(p: np.ndarray, spam_weight: float, ham_weight: float, spam_at: float, ham_at: float) -> np.ndarray:
    return np.where(p >= spam_at, spam_weight * (p - 0.5) / 0.5, np.where(p <= ham_at, ham_weight * (0.5 - p) / 0.5, 0.0))


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from milterguard import settings as S
    from milterguard.cli.common import load, load_engine
    from milterguard.cli.evaluate import miss_at_fp
    from milterguard.cli.scan import build
    from milterguard.corpus import select
    from milterguard.stores import models as ml
    from milterguard.stores.bayes import combine, token_hash
    from milterguard.learn.tokens import tokenize
    from milterguard.mail.raw import iter_message_files, read_message

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spam", action="append", required=True)
    parser.add_argument("--ham", action="append", required=True)
    parser.add_argument("--repeats", type=int, default=1, help="shuffles of the 5 folds (random_state 0, 1, ...)")
    args = parser.parse_args(argv)

    sets = ["bayes.enabled=false", "ml.enabled=false", "bayes.autolearn=false"]
    sets += ["dns.enabled=false"] if "dns.enabled" in S.BY_KEY else []
    cfg_args = argparse.Namespace(etc_dir=None, config=[], sets=sets)
    config = load(cfg_args)
    engine = load_engine(cfg_args, config)
    weights = {name: engine.ruleset.rules[name].weight for name in ("BAYES_SPAM", "BAYES_HAM", "ML_SPAM", "ML_HAM")}

    class Env:
        ip = None
        client_name = helo = auth = ""
        mail_from = None
        rcpt: list[str] = []

    paths = [(p, 1) for p in select(iter_message_files(args.spam), "train")]
    paths += [(p, 0) for p in select(iter_message_files(args.ham), "train")]
    t0 = time.monotonic()
    tokens, rules, labels = [], [], []
    for index, (path, label) in enumerate(paths):
        conn, txn = build(Env, read_message(path), index)
        txn.started = time.monotonic()
        verdict = engine.evaluate(conn, txn)
        tokens.append(tokenize(txn.message))
        rules.append(verdict.score)
        labels.append(label)
    y, rules_arr = np.asarray(labels), np.asarray(rules)
    hashes = [[token_hash(t) for t in toks] for toks in tokens]
    rows = [ml.columns(h) for h in hashes]
    print(f"{len(y)} train messages ({y.sum()} spam) read in {time.monotonic() - t0:.0f}s", file=sys.stderr)

    def bayes_probs(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        counts: dict[str, list[int]] = {}
        for i in train:
            for t in tokens[i]:
                counts.setdefault(t, [0, 0])[y[i]] += 1
        n_spam = int(y[train].sum())
        out = []
        for i in test:
            found = [(c[1], c[0]) for c in (counts.get(t) for t in tokens[i]) if c]
            out.append(combine(found, n_spam, len(train) - n_spam)[0])
        return np.asarray(out)

    th = {k: config[k] for k in ("bayes.spam_probability", "bayes.ham_probability", "ml.spam_probability",
                                 "ml.ham_probability")}
    results: dict[str, list[tuple[float, float, float]]] = {"Bayes": [], "classifier": [], "full score": []}
    for repeat in range(args.repeats):
        folds = StratifiedKFold(5, shuffle=True, random_state=repeat).split(np.zeros(len(y)), y)
        for train, test in folds:
            bayes = bayes_probs(train, test)
            model = ml.fit([rows[i] for i in train], list(y[train]))
            clf = np.asarray([model.probability(hashes[i]) for i in test])
            full = (rules_arr[test]
                    + _emit(bayes, weights["BAYES_SPAM"], weights["BAYES_HAM"], th["bayes.spam_probability"],
                            th["bayes.ham_probability"])
                    + _emit(clf, weights["ML_SPAM"], weights["ML_HAM"], th["ml.spam_probability"],
                            th["ml.ham_probability"]))
            for name, scores in (("Bayes", bayes), ("classifier", clf), ("full score", full)):
                labels_t, s = list(y[test]), list(scores)
                results[name].append((roc_auc_score(labels_t, s), miss_at_fp(labels_t, s, 0.001),
                                      miss_at_fp(labels_t, s, 0.01)))
    print(f"{'mean of ' + str(5 * args.repeats) + ' folds':<18} {'ROC AUC':>8} {'missed @0.1% FP':>16} {'missed @1% FP':>14}")
    for name, rs in results.items():
        auc, m1, m2 = np.mean(rs, axis=0)
        print(f"{name:<18} {auc:>8.4f} {100 * m1:>15.1f}% {100 * m2:>13.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
