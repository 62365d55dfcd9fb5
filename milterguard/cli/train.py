"""Train the classifier on the learned samples and publish it in Redis for every node."""

from __future__ import annotations

import time

from milterguard.cli.common import CliError, load, report
from milterguard.cli.learn import open_store
from milterguard.stores import models as ml
from milterguard.clients.redis_client import RedisReadOnly, RedisUnavailable


def add_arguments(parser) -> None:
    parser.add_argument("--alpha", type=float, default=ml.DEFAULT_ALPHA,
                        help=f"regularisation strength of the classifier (default {ml.DEFAULT_ALPHA:g})")


def run(args) -> int:
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
