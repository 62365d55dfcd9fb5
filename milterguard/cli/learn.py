"""Learn messages as spam or ham into the Bayes tokens (and the classifier's samples) in Redis.

Files, directories, Maildirs and mbox files are read.  A message learned
twice counts once, on every node sharing the Redis; learning it as the
other class moves its counts (relearn).  Writes go to the Redis master
only; a node with only a replica refuses.
"""

from __future__ import annotations

import sys
from typing import Iterable

from milterguard.cli.common import CliError, load, report
from milterguard.corpus import Progress
from milterguard.stores.bayes import Bayes, message_digest
from milterguard.mail.sources import count_messages, iter_messages
from milterguard.learn.tokens import tokenize
from milterguard.mail.message import Message
from milterguard.clients.redis_client import RedisReadOnly, RedisStore, RedisUnavailable


def add_arguments(parser) -> None:
    label = parser.add_mutually_exclusive_group(required=True)
    label.add_argument("--spam", action="store_true", help="learn the messages as spam")
    label.add_argument("--ham", action="store_true", help="learn the messages as ham")
    add_paths(parser)


def add_paths(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="message files, directories, Maildirs or mbox files")
    parser.add_argument("--progress", action="store_true", default=None,
                        help="draw a progress bar even when stderr is not a terminal")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def open_store(config) -> RedisStore:
    """The Redis of the configuration; CliError when there is none."""
    store = RedisStore.from_config(config)
    if store is None:
        raise CliError("Redis is not configured: set redis.url (or redis.sentinels)")
    return store


def open_bayes(config) -> Bayes:
    """The Bayes store of the configuration, for writing; CliError when there is none."""
    store = open_store(config)
    if not store.can_write:
        raise CliError("this node only reads Redis (replicas without redis.url, or redis.read_only): "
                       "learn on a node that knows the master")
    return Bayes(store, max_samples=config["ml.max_samples"])


def learn_paths(bayes: Bayes, config, paths: list[str], label: str, progress: Progress | None = None) -> dict[str, int]:
    """Learn (label 'spam'/'ham') or forget (label '') every message under PATHS; counts per outcome."""
    return learn_messages(bayes, config, iter_messages(paths), label, progress)


def learn_messages(bayes: Bayes, config, messages: Iterable[tuple[str, bytes]], label: str,
                   progress: Progress | None = None) -> dict[str, int]:
    """Learn or forget each (name, bytes) of MESSAGES, as learn_paths does; counts per outcome."""
    counts = {"learned": 0, "relearned": 0, "unlearned": 0, "known": 0, "unreadable": 0}
    for name, raw in messages:
        try:
            msg = Message.from_bytes(raw, max_scan_bytes=config["message.max_scan_bytes"],
                                     max_text_chars=config["message.max_text_chars"])
        except (OSError, ValueError) as exc:
            print(f"milterguard: {name}: {exc}", file=sys.stderr)
            counts["unreadable"] += 1
            continue
        result = bayes.learn(message_digest(msg), tokenize(msg), label)
        counts[result.outcome] += 1
        if progress is not None:
            progress.step()
    return counts


def run_learning(args, label: str) -> int:
    try:
        config = load(args)
        bayes = open_bayes(config)
        progress = Progress(count_messages(args.paths), "learning" if label else "unlearning", enabled=args.progress)
        counts = learn_paths(bayes, config, args.paths, label, progress)
        line = summary(bayes, config, label, counts)
    except RedisReadOnly as exc:
        return report(CliError(str(exc)))
    except RedisUnavailable as exc:
        return report(CliError(f"Redis not reachable: {exc}", status=75))
    except CliError as exc:
        return report(exc)
    if not args.quiet:
        print(line)
    return 1 if counts["unreadable"] else 0


def summary(bayes: Bayes, config, label: str, counts: dict[str, int]) -> str:
    """After learning: expire rare tokens when messages were added, and say what was done and
    what is learned now.  Raises RedisUnavailable."""
    expired = None
    if label and counts["learned"]:
        expired = bayes.expire(config["bayes.max_tokens"])
    n_spam, n_ham = bayes.totals()
    done = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    line = f"{done or 'nothing to do'}; now {n_spam} spam and {n_ham} ham learned"
    if expired and expired["removed"]:
        line += f"; {expired['removed']} rare tokens expired ({expired['tokens']} kept)"
    return line


def run(args) -> int:
    return run_learning(args, "spam" if args.spam else "ham")
