"""A per-process copy of sets of map entries kept in Redis, read again when their version changes.

The allow and block lists (stores/lists.py) and the maps of rules in Redis
(stores/redis_maps.py) are both sets of map entries (see
milterguard/ruleset/maps.py) that every node reads from one Redis.  Each
process keeps them as the in-memory maps the files give, so a look-up never
waits for Redis.  At most every `check_interval` seconds one read of a
version (on a replica when there is one) tells whether the copy is stale;
if so the stale sets are read again in one round trip.  While Redis cannot
be reached the copy is kept; the Redis client logs the outage once when it
begins and once when it ends (clients/outage.py), for everything that uses
it.

Every change writes the sets and a new version in one transaction on the
master (`change_set`), so that a node that sees the new version reads the
new entries.  A version is a random value rather than a counter: a Redis
that lost its data (restarted without persistence, or a replica promoted
before it caught up) and counted again from 0 would otherwise show a node
an old number with other entries.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Hashable

from milterguard.ruleset.maps import MapFile
from milterguard.yamlsrc import SourceError

if TYPE_CHECKING:
    from milterguard.clients.redis_client import RedisStore


class RedisCopy:
    """Maps read from sets in Redis, by name; a copy in this process, refreshed on a new version.

    A subclass says what its version is (`_version`) and which sets to read
    for it (`_read`); `refresh` asks and reads at most every check_interval.
    """

    what = "sets"  # for the debug line of a look that found Redis away
    log = logging.getLogger("milterguard.redis")  # a subclass logs under its own name

    def __init__(self, store: RedisStore, check_interval: float = 1.0) -> None:
        self.store = store
        self.check_interval = check_interval
        self._maps: dict[Hashable, MapFile] = {}
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self.version: Any = None  # of the copy (None: no version in Redis)
        self.loaded = False  # whether there is a copy at all
        self._pid = os.getpid()

    def refresh(self, force: bool = False) -> None:
        """Ask for the version at most every check_interval; read the sets again when it changed."""
        if self._pid != os.getpid():
            # A worker forked while another thread held the lock: that thread did not come along.
            self._pid, self._lock = os.getpid(), threading.Lock()
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is asking; this message is judged by the copy
        from milterguard.clients.redis_client import RedisUnavailable  # loaded with the store already

        try:
            self._checked = now
            try:
                # The version is read before the sets: a change made in between is read
                # again at the next look, never missed.
                version = self._version()
                if version != self.version or not self.loaded:
                    self._maps, self.version, self.loaded = self._read(version), version, True
            except RedisUnavailable as exc:
                # The Redis client logs the outage once for everything that uses it (and skips
                # Redis at once while it backs off); the maps judge by their copy meanwhile.
                self.log.debug("%s in Redis not read (%s); %s", self.what, exc,
                          f"the last copy ({self.entries} entries) stands" if self.loaded else "no copy yet")
        finally:
            self._lock.release()

    @property
    def entries(self) -> int:
        return sum(map(len, self._maps.values()))

    def _version(self) -> Any:
        raise NotImplementedError

    def _read(self, version: Any) -> dict[Hashable, MapFile]:
        raise NotImplementedError

    def _read_sets(self, keys: dict[Hashable, str]) -> dict[Hashable, MapFile]:
        """The sets of KEYS (name -> Redis key) as maps, in one round trip; empty sets are left out.

        A set that no longer parses keeps the entries of the copy, and is logged.
        """
        with self.store.reader().pipeline() as pipe:
            for key in keys.values():
                pipe.smembers(key)
            members = pipe.execute()
        maps: dict[Hashable, MapFile] = {}
        for (name, key), entries in zip(keys.items(), members):
            if not entries:
                continue
            try:
                maps[name] = MapFile.parse("\n".join(sorted(e.decode() for e in entries)), f"redis {key}")
            except SourceError as exc:
                self.log.error("set %s not reloaded, keeping its previous entries: %s", key, exc)
                if name in self._maps:
                    maps[name] = self._maps[name]
        return maps


def set_members(store: RedisStore, key: str) -> list[str]:
    """The members of set KEY, sorted. Raises RedisUnavailable."""
    return sorted(e.decode() for e in store.reader().smembers(key))


def new_version() -> str:
    return secrets.token_hex(8)


def change_set(store: RedisStore, command: str, key: str, entries: list[str],
               also: Callable[[Any], None]) -> list[str]:
    """Add ("sadd") or remove ("srem") ENTRIES of set KEY; return those that changed it.

    ALSO(pipe) adds the new version (and any other bookkeeping) to the same
    transaction on the master.  Raises RedisUnavailable, RedisReadOnly.
    """
    # Entries are kept in lower case, as the maps compare them: Alice@X and alice@x are one entry.
    wanted = list(dict.fromkeys(e.strip().lower() for e in entries))
    with store.writer().pipeline(transaction=True) as pipe:
        for entry in wanted:
            getattr(pipe, command)(key, entry)
        also(pipe)
        counts = pipe.execute()
    return [entry for entry, count in zip(wanted, counts) if count]


_COPIES: dict[tuple[type, int], RedisCopy] = {}


def copy_for(config: Any, cls: type[RedisCopy]) -> Any:
    """The per-process CLS copy of the Redis of CONFIG (None without Redis), polled every lists.check_interval."""
    # Imported here: a filter or scan without Redis never loads the Redis client.
    from milterguard.clients.redis_client import get_store

    store = get_store(config)
    if store is None:
        return None
    copy = _COPIES.get((cls, id(store)))
    if copy is None or copy.store is not store:
        copy = _COPIES[(cls, id(store))] = cls(store)
    copy.check_interval = config["lists.check_interval"]
    return copy
