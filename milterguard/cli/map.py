"""Show and edit the maps of rules kept in Redis (`match: {map: redis:NAME, ...}`).

    milterguard map add blocked_clients 192.0.2.0/24 198.51.100.7
    milterguard map del blocked_clients 198.51.100.7
    milterguard map show [blocked_clients]
    milterguard map import blocked_clients FILE

NAME is given with or without `redis:`.  Writes go to the Redis master; a
running filter picks a change up within lists.check_interval seconds, on
every node that shares the Redis.  `import` adds the entries of a map file
(a relative name is looked up in rules.maps_dirs, as rules do).
"""

from __future__ import annotations

from pathlib import Path

from milterguard.cli.common import CliError, load, report
from milterguard.cli.list import edited
from milterguard.clients.redis_client import RedisUnavailable, get_store
from milterguard.stores.redis_maps import (import_file, map_add, map_entries, map_key, map_name, map_names,
                                           map_remove)
from milterguard.yamlsrc import SourceError


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("add", "del", "show", "import"),
                        help="add or delete entries, show a map (or the names of all), or copy a map file in")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the map: NAME or redis:NAME")
    parser.add_argument("entries", nargs="*", metavar="ENTRY",
                        help="email address, domain (with its subdomains), IP address or CIDR; for import, the file")


def run(args) -> int:
    try:
        config = load(args)
        if args.action != "show" and (not args.name or not args.entries):
            raise CliError(f"map {args.action} needs a map name and "
                           + ("a map file" if args.action == "import" else "at least one entry"))
        try:
            name = map_name(args.name) if args.name else ""
        except ValueError as exc:
            raise CliError(str(exc)) from None
        store = get_store(config)
        if store is None:
            raise CliError("maps in Redis need a Redis (redis.url, redis.replicas or redis.sentinels)")
        try:
            return _run(config, store, name, args)
        except RedisUnavailable as exc:
            raise CliError(f"{exc}; nothing changed") from None
    except CliError as exc:
        return report(exc)


def _run(config, store, name: str, args) -> int:
    if args.action == "show":
        for found in [name] if name else map_names(store):
            entries = map_entries(store, found)
            print(f"# redis:{found}: {map_key(store, found)}, {len(entries)} entries")
            if name:
                print("".join(f"{entry}\n" for entry in entries), end="")
        return 0
    key = map_key(store, name)
    if args.action == "import":
        if len(args.entries) != 1:
            raise CliError("map import takes one map file")
        path = _map_file(config, args.entries[0])
        try:
            added = import_file(store, name, path)
        except SourceError as exc:
            raise CliError(f"{exc}; nothing imported") from None
        print(f"{path}: {len(added)} entries added to {key}")
        return 0
    if args.action == "add":
        return edited(lambda: map_add(store, name, args.entries), args, key)
    return edited(lambda: map_remove(store, name, args.entries), args, key)


def _map_file(config, name: str) -> Path:
    """FILE as it is, or looked up in rules.maps_dirs as a rule's `map:` is."""
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return path
    for base in config["rules.maps_dirs"]:
        found = Path(config.expand(base)) / path
        if found.is_file():
            return found
    raise CliError(f"map file {name!r} not found (looked in the current directory and rules.maps_dirs)")
