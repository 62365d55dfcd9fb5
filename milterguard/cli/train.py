"""Train the classifier on the learned samples and publish it in Redis for every node.

With `--corpus DIR --output FILE`, build the model shipped with the package
from a corpus on disk instead (no Redis; see milterguard/cli/shipped.py).
"""

from __future__ import annotations

import os
import time

from milterguard.cli.common import CliError, load, report
from milterguard.cli.learn import open_store
from milterguard.stores import models as ml
from milterguard.clients.redis_client import RedisReadOnly, RedisUnavailable


def add_arguments(parser) -> None:
    parser.add_argument("--alpha", type=float, default=ml.DEFAULT_ALPHA,
                        help=f"regularisation strength of the classifier (default {ml.DEFAULT_ALPHA:g}; "
                             "with --corpus the shipped model's own, 3e-4)")
    parser.add_argument("--corpus", metavar="DIR",
                        help="build a model file from the spam/, ham/ and hard_ham/ directories under DIR instead "
                             "(no Redis); with --output")
    parser.add_argument("--output", metavar="FILE", help="with --corpus: the model file to write (its provenance "
                        "goes next to it, .json)")
    parser.add_argument("--split", choices=("train", "time", "all"), default="train",
                        help="with --corpus: fit on the fixed train split (default), on all but the newest quarter "
                             "by Date (time), or on everything")
    parser.add_argument("--progress", action="store_true", default=None, help="draw progress bars")


def run_corpus(args) -> int:
    import shlex

    from milterguard.cli import shipped

    if not args.output:
        return report(CliError("--corpus needs --output FILE"))
    alpha = shipped.SHIPPED_ALPHA if args.alpha == ml.DEFAULT_ALPHA else args.alpha
    command = "milterguard train --corpus CORPUS --output " + shlex.quote(os.path.relpath(args.output)) + (
        f" --split {args.split}" if args.split != "train" else "") + (f" --alpha {alpha:g}" if alpha != shipped.SHIPPED_ALPHA else "")
    t0 = time.monotonic()
    try:
        prov = shipped.build(args.corpus, args.output, split=args.split, alpha=alpha, progress=args.progress,
                             command=command)
    except (OSError, ValueError) as exc:
        return report(CliError(str(exc)))
    counts = ", ".join(f"{src}: {c['spam']} spam, {c['ham']} ham" for src, c in prov["trained_on"].items())
    print(f"{args.output}: trained on {counts} in {time.monotonic() - t0:.1f}s; {prov['nonzero_weights']} weights; "
          f"sha256 {prov['sha256'][:16]}")
    return 0


def run(args) -> int:
    if args.corpus:
        return run_corpus(args)
    try:
        config = load(args)
        store = open_store(config)
        t0 = time.monotonic()
        model = ml.train(store, alpha=args.alpha)
    except RedisReadOnly as exc:
        return report(CliError(str(exc)))
    except RedisUnavailable as exc:
        return report(CliError(f"Redis not reachable: {exc}", status=75))
    except ValueError as exc:
        return report(CliError(str(exc)))
    except CliError as exc:
        return report(exc)
    print(f"model version {model.version} trained on {model.samples} samples in {time.monotonic() - t0:.1f}s; "
          f"running filters load it within ml.poll_interval ({config['ml.poll_interval']:g}s)")
    return 0
