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


def run(args) -> int:
    # Imported here: every command's module is imported to build the command line, and the
    # Redis client library is only needed by this one.
    from milterguard.mail.message import Message
    from milterguard.clients.redis_client import RedisUnavailable, get_store

    try:
        config = load(args)
        store = get_store(config)
        if store is None:
            raise CliError("Redis is off (set redis.url, redis.replicas or redis.sentinels)")
        fuzzy = FuzzyStore(store, config["fuzzy.ttl"])
        max_distance = config["fuzzy.max_distance"]
        status = 0
        for path in iter_message_files(args.paths):
            raw = read_message(path)
            msg = Message.from_bytes(raw, max_scan_bytes=config["message.max_scan_bytes"],
                                     max_text_chars=config["message.max_text_chars"])
            d = digest(msg.text)
            if d.words < config["fuzzy.min_words"]:
                print(f"{path}\tskipped: {d.words} words, fewer than fuzzy.min_words")
                status = max(status, 1)
                continue
            if args.action == "add":
                fuzzy.add(d)
                print(f"{path}\tadded\texact {d.exact[:16]} simhash {d.simhex}")
            elif args.action == "del":
                found = fuzzy.delete(d)
                print(f"{path}\t{'deleted' if found else 'not found'}\texact {d.exact[:16]} simhash {d.simhex}")
                status = max(status, 0 if found else 1)
            else:
                match = fuzzy.lookup(d, max_distance)
                if match is None:
                    print(f"{path}\tno match\tsimhash {d.simhex}")
                    status = max(status, 1)
                elif match.kind == "exact":
                    print(f"{path}\tHASH_DENIED\texact {d.exact[:16]}")
                else:
                    print(f"{path}\tFUZZY_DENIED\tdistance {match.distance} to {match.simhash}")
        return status
    except RedisUnavailable as exc:
        return report(CliError(f"Redis unavailable: {exc}"))
    except CliError as exc:
        return report(exc)
