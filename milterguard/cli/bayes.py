"""Bayes database: `stats` shows what was learned, `expire` drops rare tokens down to bayes.max_tokens."""

from __future__ import annotations

import json

from milterguard.cli.common import CliError, load, report
from milterguard.cli.learn import open_store
from milterguard.stores.bayes import Bayes
from milterguard.clients.redis_client import RedisUnavailable


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("stats", "expire"), help="stats: counts and memory; expire: drop rare tokens")
    parser.add_argument("--max-tokens", type=int, default=None, help="with expire: keep this many (default bayes.max_tokens)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    try:
        config = load(args)
        store = open_store(config)
        bayes = Bayes(store)
        if args.action == "expire":
            result = bayes.expire(args.max_tokens or config["bayes.max_tokens"])
        else:
            result = bayes.stats()
            version = store.reader().get(store.key("ml", "version"))
            result["model_version"] = int(version or 0)
            result["min_learns"] = config["bayes.min_learns"]
            result["active"] = min(result["spam"], result["ham"]) >= config["bayes.min_learns"]
    except RedisUnavailable as exc:
        return report(CliError(f"Redis not reachable: {exc}", status=75))
    except CliError as exc:
        return report(exc)
    if args.json:
        print(json.dumps(result))
    elif args.action == "expire":
        print(f"{result['removed']} tokens removed, {result['tokens']} kept")
    else:
        print(f"learned:  {result['spam']} spam, {result['ham']} ham "
              f"({'active' if result['active'] else 'inactive until %d of each' % result['min_learns']})")
        print(f"tokens:   {result['tokens']}")
        print(f"samples:  {result['samples']} kept for training; model version {result['model_version'] or 'none'}")
        print(f"memory:   {result['used_memory'] / 1048576:.1f} MB used by Redis ({result['server']})")
    return 0
