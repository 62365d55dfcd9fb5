"""Show and edit the allow and block lists (files under lists.dir, or sets in Redis).

    milterguard list add block 192.0.2.0/24 spammer@example.net
    milterguard list add allow partner.example --domain example.org
    milterguard list del block 192.0.2.0/24
    milterguard list show [allow|block] [--domain example.org]
    milterguard list import [allow|block] [--domain example.org]

With `lists.backend: files` they edit the files under lists.dir; with
`redis` they edit the sets in Redis (through the master), and `import`
copies the files under lists.dir into them (all of them, or one domain's;
--domain "" for the global ones).  A running filter picks the change up
within lists.check_interval seconds, without a reload, on every node that
shares the Redis.
"""

from __future__ import annotations

from pathlib import Path

from milterguard.cli.common import CliError, load, report
from milterguard.clients.redis_client import RedisUnavailable, get_store
from milterguard.stores.lists import (GLOBAL, KINDS, add_entries, import_files, list_path, read_entries, redis_add,
                                      redis_domains, redis_entries, redis_key, redis_remove, remove_entries)
from milterguard.yamlsrc import SourceError


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("add", "del", "show", "import"),
                        help="add or delete entries, show the lists, or copy the list files into Redis")
    parser.add_argument("kind", nargs="?", choices=KINDS, help="allow or block (show, import: both when omitted)")
    parser.add_argument("entries", nargs="*", metavar="ENTRY",
                        help="email address, domain (with its subdomains), IP address or CIDR")
    parser.add_argument("--domain", default=None,
                        help="the lists of this recipient domain (default: the global ones; import: all of them)")


def run(args) -> int:
    try:
        config = load(args)
        domain = None if args.domain is None else args.domain.lower().strip(".")
        if args.action in ("add", "del") and (not args.kind or not args.entries):
            raise CliError(f"list {args.action} needs a kind (allow or block) and at least one entry")
        base = Path(config.expand(config["lists.dir"])) if config["lists.dir"] else None
        if config["lists.backend"] == "redis":
            store = get_store(config)
            try:
                return _in_redis(store, base, args, domain)
            except RedisUnavailable as exc:
                raise CliError(f"{exc}; nothing changed") from None
        if base is None:
            raise CliError("lists.dir is empty: lists are off")
        if args.action == "import":
            raise CliError("list import copies the files into Redis: it needs lists.backend: redis")
        return _in_files(base, args, domain or GLOBAL)
    except CliError as exc:
        return report(exc)


def _in_files(base: Path, args, domain: str) -> int:
    if args.action == "show":
        domains = [domain] if domain else [GLOBAL] + sorted(p.name for p in base.glob("*") if p.is_dir())
        return _show({(d, k): (str(list_path(base, k, d)), lambda d=d, k=k: read_entries(list_path(base, k, d)))
                      for d in domains for k in KINDS}, domain, args.kind)
    path = list_path(base, args.kind, domain)
    if args.action == "add":
        return edited(lambda: add_entries(path, args.entries), args, str(path))
    return edited(lambda: remove_entries(path, args.entries), args, str(path))


def _in_redis(store, base: Path | None, args, domain: str | None) -> int:
    if args.action == "import":
        if base is None:
            raise CliError("lists.dir is empty: no files to import")
        try:
            done = import_files(store, base, domain, args.kind)
        except SourceError as exc:
            raise CliError(f"{exc}; the files before it were imported") from None
        for path, key, added in done:
            print(f"{path}: {len(added)} entries added to {key}")
        if not done:
            print(f"no list files under {base}")
        return 0
    if args.action == "show":
        domains = [domain] if domain else [GLOBAL] + redis_domains(store)
        return _show({(d, k): (redis_key(store, k, d), lambda d=d, k=k: redis_entries(store, k, d))
                      for d in domains for k in KINDS}, domain or GLOBAL, args.kind)
    domain = domain or GLOBAL
    key = redis_key(store, args.kind, domain)
    if args.action == "add":
        return edited(lambda: redis_add(store, args.kind, domain, args.entries), args, key)
    return edited(lambda: redis_remove(store, args.kind, domain, args.entries), args, key)


def edited(change, args, where: str) -> int:
    """Apply CHANGE (add or remove ARGS.entries) and say what it did; 1 when del found none."""
    try:
        done = change()
    except SourceError as exc:
        raise CliError(str(exc)) from None
    verb = "added to" if args.action == "add" else "removed from"
    if args.action == "del":
        missing = set(e.lower() for e in args.entries) - set(e.lower() for e in done)
        if missing:
            print(f"not in {where}: {', '.join(sorted(missing))}")
    for entry in done:
        print(f"{entry} {verb} {where}")
    return 0 if done or args.action == "add" else 1


def _show(lists: dict, domain: str, kind: str | None) -> int:
    """Print each list of LISTS ((domain, kind) -> (where, entries())) that has entries or was asked for."""
    for (dom, k), (where, entries) in lists.items():
        if kind and k != kind:
            continue
        found = entries()
        if found or domain or kind:
            print(f"# {k} {'(global)' if not dom else dom}: {where}")
            for entry in found:
                print(entry)
    return 0
