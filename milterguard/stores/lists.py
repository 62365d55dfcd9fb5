"""Allow and block lists, global and per recipient domain: map files, or sets in Redis.

With `lists.backend: files` (the default), the lists are map files under
`lists.dir` (each a map, see milterguard/ruleset/maps.py: one entry a line,
an email address, a domain with its subdomains, an IP address or a CIDR)::

    {lists.dir}/allow.map              global
    {lists.dir}/block.map
    {lists.dir}/example.org/allow.map  for recipients at example.org (and its subdomains)
    {lists.dir}/example.org/block.map

A file is read again when its modification time or size changes (looked at
most every `lists.check_interval` seconds); a file that no longer parses
keeps its previous entries and is logged once.  `milterguard list` edits
the files.

With `lists.backend: redis` (since 0.3), every node reads the same lists
from Redis (milterguard/clients/redis_client.py), keys under redis.prefix::

    lists:allow, lists:block                      sets: the global lists
    lists:d:example.org:allow, ...:block          sets: example.org's lists
    lists:domains                                 set: the domains that have lists
    lists:version                                 a new random value at every change

Each process keeps a copy of the lists as the same in-memory maps the
files give, so a look-up never waits for Redis.  At most every
`lists.check_interval` seconds one GET of `lists:version` (on a replica when
there is one) tells whether the copy is stale; if so the sets are read
again in one round trip.  While Redis cannot be reached the copy is kept,
and the outage is logged once when it begins and once when it ends
(clients/outage.py).  `milterguard list` writes the sets through the master
and sets a new version in the same transaction.  The version is a random
value rather than a counter: a Redis that lost its data (restarted without
persistence, or a replica promoted before it caught up) and counted again
from 0 would otherwise show a node an old number with other lists.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from milterguard.ruleset.maps import MapFile
from milterguard.stores.redis_copy import RedisCopy, change_set, copy_for, new_version, set_members
from milterguard.yamlsrc import SourceError

if TYPE_CHECKING:
    from milterguard.clients.redis_client import RedisStore

log = logging.getLogger("milterguard.lists")

KINDS = ("allow", "block")
GLOBAL = ""  # the domain key of the global lists


def list_path(base: Path, kind: str, domain: str = GLOBAL) -> Path:
    if kind not in KINDS:
        raise ValueError(f"list kind is allow or block, got {kind!r}")
    return (base / domain.lower().strip(".") / f"{kind}.map") if domain else base / f"{kind}.map"


class _Lists:
    """The lists as maps by (domain, kind), and the look-up both backends share."""

    def __init__(self, check_interval: float) -> None:
        self.check_interval = check_interval
        self._maps: dict[tuple[str, str], MapFile] = {}
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        raise NotImplementedError

    def lookup(self, kind: str, domain: str, value: str, is_ip: bool = False) -> str | None:
        """The entry of list KIND (of DOMAIN's lists, or the global ones for "") matching VALUE."""
        self.refresh()
        maps = self._maps
        if not maps:
            return None  # no list at all (the usual case for most checks' look-ups)
        domain = domain.lower()
        keys = [(GLOBAL, kind)] if domain == GLOBAL else []
        if domain:
            # example.org's lists also serve sub.example.org.
            parts = domain.split(".")
            keys = [(".".join(parts[i:]), kind) for i in range(len(parts) - 1)]
        for key in keys:
            m = maps.get(key)
            if m is None:
                continue
            entry = m.match_ip(value) if is_ip else m.match_any(value)
            if entry is not None:
                return entry
        return None

    def domains(self) -> list[str]:
        self.refresh(force=True)
        return sorted({d for d, _ in self._maps if d})


def list_files(base: Path) -> dict[tuple[str, str], Path]:
    """The list files under BASE, by (domain, kind)."""
    found: dict[tuple[str, str], Path] = {}
    try:
        entries = list(os.scandir(base))
    except OSError:
        return found
    for entry in entries:
        if entry.is_file() and entry.name in ("allow.map", "block.map"):
            found[(GLOBAL, entry.name[:-4])] = Path(entry.path)
        elif entry.is_dir():
            for kind in KINDS:
                path = Path(entry.path) / f"{kind}.map"
                if path.is_file():
                    found[(entry.name.lower(), kind)] = path
    return found


class ListStore(_Lists):
    """The lists of one directory, reloaded on change."""

    def __init__(self, base: str | Path, check_interval: float = 1.0) -> None:
        super().__init__(check_interval)
        self.base = Path(base)
        self._stamps: dict[tuple[str, str], tuple[float, int]] = {}

    def refresh(self, force: bool = False) -> None:
        """Reload the files that changed since the last look (at most every check_interval)."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval:
            return
        with self._lock:
            self._checked = now
            files = list_files(self.base)
            for key in list(self._maps):
                if key not in files:
                    del self._maps[key]
                    self._stamps.pop(key, None)
            for key, path in files.items():
                try:
                    st = path.stat()
                except OSError:
                    continue
                stamp = (st.st_mtime, st.st_size)
                if self._stamps.get(key) == stamp:
                    continue
                self._stamps[key] = stamp
                try:
                    self._maps[key] = MapFile.load(path)
                except SourceError as exc:
                    log.error("list %s not reloaded, keeping its previous entries: %s", path, exc)


def redis_key(store: RedisStore, kind: str = "", domain: str = GLOBAL) -> str:
    """The key of list KIND (global, or DOMAIN's); without KIND, the set of domains."""
    if not kind:
        return store.key("lists", "domains")
    if kind not in KINDS:
        raise ValueError(f"list kind is allow or block, got {kind!r}")
    return store.key("lists", "d", domain, kind) if domain else store.key("lists", kind)


class RedisLists(RedisCopy, _Lists):
    """The lists in Redis: a copy in this process, read again when lists:version changes.

    RedisCopy's refresh comes first, and its __init__ sets what _Lists's look-up uses.
    """

    what = "lists"
    log = log

    def _version(self) -> bytes | None:
        return self.store.reader().get(self.store.key("lists", "version"))

    def _read(self, version: bytes | None) -> dict[tuple[str, str], MapFile]:
        """Every list, in two round trips."""
        domains = redis_domains(self.store)
        names = [(GLOBAL, kind) for kind in KINDS] + [(d, kind) for d in domains for kind in KINDS]
        return self._read_sets({name: redis_key(self.store, name[1], name[0]) for name in names})


_STORES: dict[tuple[str, float], ListStore] = {}


def store_for(config) -> _Lists | None:
    """The per-process lists of CONFIG: in Redis, or the files of lists.dir (None when it is empty)."""
    if config["lists.backend"] == "redis":
        return copy_for(config, RedisLists)  # None without Redis: refused when the configuration is read
    base = config["lists.dir"]
    if not base:
        return None
    # Several checks ask per message: the expanded path is worked out once per setting.
    setting = (base, config.etc_dir, config.share_dir, config["lists.check_interval"])
    key = _KEYS.get(setting)
    if key is None:
        key = _KEYS[setting] = (config.expand(base), setting[3])
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = ListStore(*key)
    return store


_KEYS: dict[tuple, tuple[str, float]] = {}


# ------------------------------------------------------------------ editing (the `list` command)


def read_entries(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def add_entries(path: Path, entries: list[str]) -> list[str]:
    """Append ENTRIES not yet in the file (validated as map entries); return those added."""
    MapFile.parse("\n".join(entries), "<command line>")  # raises SourceError on a bad entry
    present = {e.lower() for e in read_entries(path)}
    added = [e for e in dict.fromkeys(entries) if e.lower() not in present]
    if added:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        _replace(path, text + "".join(f"{e}\n" for e in added))
    return added


def remove_entries(path: Path, entries: list[str]) -> list[str]:
    """Remove the lines holding ENTRIES (comments elsewhere stay); return those removed."""
    wanted = {e.lower() for e in entries}
    if not path.exists():
        return []
    kept, removed = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        entry = line.split("#", 1)[0].strip()
        if entry and entry.lower() in wanted:
            removed.append(entry)
        else:
            kept.append(line)
    if removed:
        _replace(path, "".join(kept))
    return removed


def _replace(path: Path, text: str) -> None:
    # Write a new file and rename it over the old one: a filter reading the list
    # at that moment sees either version whole.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------ editing the lists in Redis


def redis_entries(store: RedisStore, kind: str, domain: str = GLOBAL) -> list[str]:
    """The entries of list KIND (global, or DOMAIN's), sorted. Raises RedisUnavailable."""
    return set_members(store, redis_key(store, kind, domain))


def redis_domains(store: RedisStore) -> list[str]:
    """The domains that have lists in Redis. Raises RedisUnavailable."""
    return set_members(store, redis_key(store))


def redis_add(store: RedisStore, kind: str, domain: str, entries: list[str]) -> list[str]:
    """Add ENTRIES (validated as map entries) to list KIND; return those that were not there.

    The sets and the version change in one transaction on the master, so that a
    node that sees the new version reads the new entries.  Raises RedisUnavailable.
    """
    MapFile.parse("\n".join(entries), "<command line>")  # raises SourceError on a bad entry
    return _redis_change(store, "sadd", kind, domain, entries)


def redis_remove(store: RedisStore, kind: str, domain: str, entries: list[str]) -> list[str]:
    """Remove ENTRIES from list KIND; return those that were there. Raises RedisUnavailable."""
    return _redis_change(store, "srem", kind, domain, entries)


def _redis_change(store: RedisStore, command: str, kind: str, domain: str, entries: list[str]) -> list[str]:
    def also(pipe) -> None:
        if domain:
            pipe.sadd(redis_key(store), domain)
        pipe.set(store.key("lists", "version"), new_version())

    return change_set(store, command, redis_key(store, kind, domain), entries, also)


def import_files(store: RedisStore, base: Path, domain: str | None = None,
                 kind: str | None = None) -> list[tuple[Path, str, list[str]]]:
    """Copy the list files under BASE into Redis: all, or DOMAIN's ("" for the global ones), of KIND.

    Returns (file, key, entries added) for each file.  Raises SourceError on a
    file that does not parse (nothing of it is copied), RedisUnavailable.
    """
    done = []
    for (dom, kind_of), path in sorted(list_files(base).items()):
        if (domain is not None and dom != domain) or (kind and kind != kind_of):
            continue
        MapFile.load(path)  # the whole file parses, or nothing of it is copied
        entries = read_entries(path)
        done.append((path, redis_key(store, kind_of, dom), redis_add(store, kind_of, dom, entries) if entries else []))
    return done
