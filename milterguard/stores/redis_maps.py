"""Maps of rules kept in Redis: `match: {map: redis:NAME, key: ...}` (since 0.3).

A map file lives on one node; a map in Redis is shared by every node of that
Redis, and `milterguard map` edits it.  Keys under redis.prefix::

    maps:m:NAME     set: the entries of map NAME, as in a map file (ruleset/maps.py)
    maps:versions   hash: NAME -> a new random value at every change of map NAME

Each process keeps a copy of the maps its rules name, as the same in-memory
maps the files give (stores/redis_copy.py), so matching never waits for
Redis.  At most every `lists.check_interval` seconds one HMGET of their
versions tells which are stale, and those are read again in one round trip.
While Redis cannot be reached the copy stands; the Redis client's outage
lines say so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from milterguard.ruleset.maps import MapFile, redis_map_name
from milterguard.stores.redis_copy import RedisCopy, change_set, copy_for, new_version, set_members

if TYPE_CHECKING:
    from milterguard.clients.redis_client import RedisStore


class RedisMaps(RedisCopy):
    """The maps in Redis that the rules name: a copy in this process, by map name."""

    what = "maps"
    log = logging.getLogger("milterguard.maps")

    def __init__(self, store: RedisStore, check_interval: float = 1.0) -> None:
        super().__init__(store, check_interval)
        self.names: tuple[str, ...] = ()
        self.version: dict[str, bytes | None] = {}

    def watch(self, names: Iterable[str]) -> None:
        """Keep a copy of the maps NAMES too, read now (the rules of a new configuration name them)."""
        names = tuple(sorted(set(self.names) | set(names)))
        if names != self.names:
            self.names = names
            self.refresh(force=True)

    def get(self, name: str) -> MapFile | None:
        """The copy of map NAME (None while it has no entries, or no copy could be read yet)."""
        self.refresh()
        return self._maps.get(name)

    def _version(self) -> dict[str, bytes | None]:
        if not self.names:
            return {}
        return dict(zip(self.names, self.store.reader().hmget(versions_key(self.store), self.names)))

    def _read(self, version: dict[str, bytes | None]) -> dict[str, MapFile]:
        """The maps whose version changed, read again; the others stay as they are."""
        stale = [n for n in self.names if not self.loaded or n not in self.version or self.version[n] != version[n]]
        maps = {n: m for n, m in self._maps.items() if n not in stale}
        maps.update(self._read_sets({name: map_key(self.store, name) for name in stale}))
        return maps


def maps_for(config) -> RedisMaps | None:
    """The per-process copy of the maps in Redis of CONFIG (None without Redis)."""
    return copy_for(config, RedisMaps)


# ------------------------------------------------------------------ editing (the `map` command)


def map_name(name: str) -> str:
    """A map name given as NAME or redis:NAME, without the prefix; ValueError on a bad one."""
    return redis_map_name(name if name.startswith("redis:") else f"redis:{name}") or ""


def map_key(store: RedisStore, name: str) -> str:
    return store.key("maps", "m", name)


def versions_key(store: RedisStore) -> str:
    return store.key("maps", "versions")


def map_entries(store: RedisStore, name: str) -> list[str]:
    """The entries of map NAME, sorted. Raises RedisUnavailable."""
    return set_members(store, map_key(store, name))


def map_names(store: RedisStore) -> list[str]:
    """The maps that were ever written. Raises RedisUnavailable."""
    return sorted(n.decode() for n in store.reader().hkeys(versions_key(store)))


def map_add(store: RedisStore, name: str, entries: list[str]) -> list[str]:
    """Add ENTRIES (validated as map entries) to map NAME; return those that were not there.

    Raises SourceError on a bad entry, RedisUnavailable.
    """
    MapFile.parse("\n".join(entries), "<command line>")
    return _change(store, "sadd", name, entries)


def map_remove(store: RedisStore, name: str, entries: list[str]) -> list[str]:
    """Remove ENTRIES from map NAME; return those that were there. Raises RedisUnavailable."""
    return _change(store, "srem", name, entries)


def _change(store: RedisStore, command: str, name: str, entries: list[str]) -> list[str]:
    return change_set(store, command, map_key(store, name), entries,
                      lambda pipe: pipe.hset(versions_key(store), name, new_version()))


def import_file(store: RedisStore, name: str, path: Path) -> list[str]:
    """Add the entries of map file PATH to map NAME; return those added.

    Raises SourceError when the file does not parse (nothing of it is copied), RedisUnavailable.
    """
    from milterguard.stores.lists import read_entries

    MapFile.load(path)  # the whole file parses, or nothing of it is copied
    entries = read_entries(path)
    return map_add(store, name, entries) if entries else []
