"""Report messages as spam by their content hashes, forget them, or check files against them.

    milterguard fuzzy add spam1.eml spam2.eml     # exact hash and SimHash into Redis
    milterguard fuzzy del spam1.eml
    milterguard fuzzy check suspect.eml           # exit 0 when every file matches, 1 otherwise

Entries expire after fuzzy.ttl; adding a message again starts its time anew.
"""

from __future__ import annotations

from milterguard.cli.common import CliError, load, report
from milterguard.stores.hashes import FuzzyStore, digest
from milterguard.mail.raw import iter_message_files, read_message


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("add", "del", "check"), help="add, delete, or check the hashes of FILEs")
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR|-", help="message files, directories of them, or -")


def open_fuzzy(config) -> FuzzyStore:
    """The hash store of the configuration; CliError when Redis is off."""
    from milterguard.clients.redis_client import get_store

    store = get_store(config)
    if store is None:
        raise CliError("Redis is off (set redis.url, redis.replicas or redis.sentinels)")
    return FuzzyStore(store, config["fuzzy.ttl"])


def apply(fuzzy: FuzzyStore, config, action: str, raw: bytes) -> tuple[str, int]:
    """ACTION (add, del, check) for one message: what to print after its name, and the status
    (1: too short to hash, not found, no match).  Raises RedisUnavailable."""
    from milterguard.mail.message import Message

    msg = Message.from_bytes(raw, max_scan_bytes=config["message.max_scan_bytes"],
                             max_text_chars=config["message.max_text_chars"])
    d = digest(msg.text)
    if d.words < config["fuzzy.min_words"]:
        return f"skipped: {d.words} words, fewer than fuzzy.min_words", 1
    if action == "add":
        fuzzy.add(d)
        return f"added\texact {d.exact[:16]} simhash {d.simhex}", 0
    if action == "del":
        found = fuzzy.delete(d)
        return f"{'deleted' if found else 'not found'}\texact {d.exact[:16]} simhash {d.simhex}", 0 if found else 1
    match = fuzzy.lookup(d, config["fuzzy.max_distance"])
    if match is None:
        return f"no match\tsimhash {d.simhex}", 1
    if match.kind == "exact":
        return f"HASH_DENIED\texact {d.exact[:16]}", 0
    return f"FUZZY_DENIED\tdistance {match.distance} to {match.simhash}", 0


def run(args) -> int:
    # Imported here: every command's module is imported to build the command line, and the
    # Redis client library is only needed by this one.
    from milterguard.clients.redis_client import RedisUnavailable

    try:
        config = load(args)
        fuzzy = open_fuzzy(config)
        status = 0
        for path in iter_message_files(args.paths):
            text, code = apply(fuzzy, config, args.action, read_message(path))
            print(f"{path}\t{text}")
            status = max(status, code)
        return status
    except RedisUnavailable as exc:
        return report(CliError(f"Redis unavailable: {exc}"))
    except CliError as exc:
        return report(exc)
