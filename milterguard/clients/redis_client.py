"""Access to the shared Redis: a master for writes, replicas or Sentinel for reads.

Every feature that keeps state shared between filter nodes (Bayes tokens,
the learned model, content hashes, reputation) goes through this module::

    from milterguard.clients.redis_client import RedisUnavailable, get_store

    store = get_store(scan.config)          # per-process, cached; None when Redis is off
    if store is None:
        return
    try:
        counts = store.reader().hmget(store.key("bayes", "t", "ab"), "s", "h")
        if learning:
            with store.writer().pipeline() as pipe:   # writer() is always the master
                pipe.hincrby(store.key("bayes", "t", "ab"), "s", 1)
                pipe.execute()
    except RedisUnavailable:
        hits.add("BAYES_TEMPFAIL")          # mail flows on

Configuration (see docs/learning.md): `redis.url` is the master
(`redis://[:PASSWORD@]HOST:PORT/DB`); `redis.replicas` lists servers read
from, first healthy one first, the master as fallback; `redis.sentinels`
with `redis.sentinel_service` discovers master and replicas through Redis
Sentinel instead, and again after a failover.  When none of these is set,
Redis features are off and `get_store` returns None.  A node configured
with replicas but no master (or `redis.read_only`) never writes: `writer()`
raises `RedisReadOnly`.

Every call is bounded by `redis.timeout` (connect and each reply; a stale
connection is retried once, so a call takes at most twice that).  A
connection error or timeout raises `RedisUnavailable`; the server is then
not asked again for a back-off interval (1 s, doubling up to
`redis.retry_max`), so an outage costs no time per message.  When no
server of the configuration answers, `Outage` logs one line, and one more
when one answers again, with the count of calls failed in between; a
server down while others answer is one line, and its return another.  The
lines carry the exception's class and text, never the client objects that
redis-py puts in some of its messages (a Sentinel's).

`store.reader().send(*command)` sends one command now and returns a
`Pending` whose `result()` reads the reply later: a check sends its
look-up as soon as the message is complete and reads the answer after the
other checks of the stage have run, so that the server works while they
do.  The command is sent from the calling thread (a thread pool would not
do: a thread waits for the interpreter lock while the caller computes).
A reply that cannot be read is asked for again through the usual path
(the next server, back-off, the outage lines), so `result()` answers or
raises RedisUnavailable as any call does.  A connection closed under the
command (Sentinel kills a replica's clients when it promotes it) is asked
again of the same server first, on a new connection; a timeout goes to
the next server.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SlaveNotFoundError

from milterguard.clients.outage import Outage

log = logging.getLogger("milterguard.redis")

# Errors that mean "this server cannot be used now" (as opposed to a bug in
# a command, which must show).
_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError, MasterNotFoundError, SlaveNotFoundError)

BACKOFF_START = 1.0
# The repr of a redis-py object (`<redis.client.Redis(<...ConnectionPool(...)>)>`),
# which a Sentinel's MasterNotFoundError carries for each sentinel: 1.9 KB of settings.
_OBJECT_REPR = re.compile(r"<[^<>]*>")
_MAX_REASON = 300


def _reason(exc: BaseException) -> str:
    """The exception's class and text, without the client objects redis-py puts in it."""
    text = str(exc)
    while True:
        stripped = _OBJECT_REPR.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = " ".join(text.replace(" :  - ", ": ").split())
    if len(text) > _MAX_REASON:
        text = text[:_MAX_REASON] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisUnavailable(Exception):
    """Redis could not be reached in time; the caller emits its *_TEMPFAIL symbol."""


class RedisReadOnly(RedisUnavailable):
    """A write was asked of a node that only knows replicas (or is read-only)."""


class _Node:
    """One Redis role (the master, a replica, a Sentinel-managed role) and its health."""

    def __init__(self, name: str, client: redis.Redis, store: "RedisStore") -> None:
        self.name = name
        self.client = client
        self.store = store
        self.down_until = 0.0
        self.failures = 0
        self.reason = ""  # why it went away, for the line that says the others are used
        self.reported = False  # its absence was logged on its own (others answered meanwhile)
        self.lock = threading.Lock()

    def usable(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, exc: Exception) -> bool:
        """Back off; True at the first failure of an absence."""
        with self.lock:
            self.failures += 1
            delay = min(self.store.retry_max, BACKOFF_START * 2 ** (self.failures - 1))
            self.down_until = time.monotonic() + delay
            if self.failures == 1:
                self.reason = _reason(exc)
                return True
        return False

    def succeeded(self) -> None:
        if self.failures:
            with self.lock:
                was_down, reported = self.failures > 0, self.reported
                self.failures, self.down_until, self.reported = 0, 0.0, False
            if was_down and reported:
                log.info("Redis %s reachable again", self.name)


def _run(nodes: list[_Node], call: Callable[[redis.Redis], Any], gone: list[_Node] | None = None,
         last: Exception | None = None) -> Any:
    """`call(client)` on the first usable node that answers, in order.  GONE and LAST: a node
    that failed this call before (Pending.result) and its error."""
    store = nodes[0].store
    gone = list(gone or ())  # nodes that went away in this call
    now = time.monotonic()
    for node in nodes:
        if not node.usable(now):
            continue
        try:
            result = call(node.client)
        except redis.ReadOnlyError as exc:
            # A master demoted to replica by a failover: find the new one.
            if node.failed(exc):
                gone.append(node)
            last = exc
            continue
        except _DOWN_ERRORS as exc:
            if node.failed(exc):
                gone.append(node)
            last = exc
            continue
        node.succeeded()
        store.outage.succeeded()
        for other in gone:
            # Only now is it known that the others answer: a Sentinel outage is one line, not one per role.
            other.reported = True
            log.warning("Redis %s not reachable (%s), using %s", other.name, other.reason, node.name)
        return result
    names = ", ".join(n.name for n in nodes)
    reason = _reason(last) if last is not None else "every server backs off, retrying soon"
    store.outage.failed(reason)
    raise RedisUnavailable(f"Redis not reachable ({names}): {reason}") from last


class GuardedPipeline:
    """A pipeline: commands are queued here and sent by `execute()` in one round trip.

    On a connection error the queue is sent to the next server of the role
    (a reader's next replica, then the master); when none answers,
    `execute()` raises RedisUnavailable.
    """

    def __init__(self, nodes: list[_Node], transaction: bool) -> None:
        self._nodes = nodes
        self._transaction = transaction
        self._queue: list[tuple[str, tuple, dict]] = []

    def execute(self, raise_on_error: bool = True) -> list:
        queue = self._queue

        def send(client: redis.Redis) -> list:
            pipe = client.pipeline(transaction=self._transaction)
            for name, args, kwargs in queue:
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute(raise_on_error=raise_on_error)

        try:
            return _run(self._nodes, send) if queue else []
        finally:
            self._queue = []

    def __getattr__(self, name: str) -> Callable[..., "GuardedPipeline"]:
        if name.startswith("_") or not callable(getattr(redis.client.Pipeline, name, None)):
            raise AttributeError(name)

        def queue(*args: Any, **kwargs: Any) -> "GuardedPipeline":
            self._queue.append((name, args, kwargs))
            return self

        return queue

    def __len__(self) -> int:
        return len(self._queue)

    def __enter__(self) -> "GuardedPipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._queue = []


class Pending:
    """A command sent to a server, its reply not read yet (GuardedClient.send)."""

    def __init__(self, nodes: list[_Node], args: tuple, node: _Node | None = None, conn: Any = None) -> None:
        self._nodes = nodes
        self._args = args
        self._node = node
        self._conn = conn

    def _release(self, clean: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._node is not None:
            if not clean:
                conn.disconnect()  # an unread or half-read reply must not reach the next user
            self._node.client.connection_pool.release(conn)

    def result(self) -> Any:
        """The reply (raw, as execute_command gives it); RedisUnavailable when no server answers."""
        conn, node = self._conn, self._node
        if conn is not None and node is not None:
            try:
                reply = conn.read_response()
            except _DOWN_ERRORS as exc:
                self._release(clean=False)
                # Asked again below, through the usual path.  A connection closed under the command
                # (a server restarted, or Sentinel killed its clients while promoting it): this server
                # first, on a new connection, as any stale connection is retried once.  A timeout:
                # this server is slow now, so it backs off and the next one is asked.
                closed = isinstance(exc, redis.ConnectionError)  # redis-py's TimeoutError is not one
                gone = [node] if not closed and node.failed(exc) else []
                args = self._args
                return _run(self._nodes, lambda client: client.execute_command(*args), gone, exc)
            except redis.ResponseError:
                self._release(clean=True)  # an error reply (no such script) was read whole
                raise
            except BaseException:
                self._release(clean=False)
                raise
            self._release(clean=True)
            node.succeeded()
            node.store.outage.succeeded()
            return reply
        args = self._args
        return _run(self._nodes, lambda client: client.execute_command(*args))

    def cancel(self) -> None:
        """The reply will not be read: drop the connection it would arrive on."""
        self._release(clean=False)

    def __del__(self) -> None:
        try:
            self._release(clean=False)
        except Exception:  # noqa: BLE001 - at interpreter exit the pool may be gone already
            pass


class GuardedClient:
    """A redis-py client for one role whose calls raise RedisUnavailable, never connection errors."""

    def __init__(self, nodes: list[_Node]) -> None:
        self._nodes = nodes

    @property
    def name(self) -> str:
        """The server that would be asked first."""
        now = time.monotonic()
        return next((n.name for n in self._nodes if n.usable(now)), self._nodes[0].name)

    def pipeline(self, transaction: bool = False) -> GuardedPipeline:
        return GuardedPipeline(self._nodes, transaction)

    def send(self, *args: Any) -> Pending:
        """Send the command ARGS now to the first server that takes it; read the reply later
        with `result()` (see the module docstring)."""
        now = time.monotonic()
        for node in self._nodes:
            if not node.usable(now):
                continue
            pool = node.client.connection_pool
            try:
                conn = pool.get_connection()
            except _DOWN_ERRORS:
                break  # result() asks through the usual path, which reports the failure
            try:
                conn.send_command(*args)
            except _DOWN_ERRORS:
                conn.disconnect()
                pool.release(conn)
                break
            except BaseException:
                conn.disconnect()
                pool.release(conn)
                raise
            return Pending(self._nodes, args, node, conn)
        return Pending(self._nodes, args)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not callable(getattr(redis.Redis, name, None)):
            raise AttributeError(name)
        return lambda *args, **kwargs: _run(self._nodes, lambda client: getattr(client, name)(*args, **kwargs))


def _client_kwargs(timeout: float) -> dict:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One immediate retry: a pooled connection to a server that restarted
        # fails once, then reconnects.  No more, so that a call stays bounded.
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 0,
    }


def _host_port(text: str) -> tuple[str, int]:
    if "://" in text:
        parts = urlsplit(text)
        return parts.hostname or "127.0.0.1", parts.port or 26379
    host, _, port = text.rpartition(":")
    if not host:
        return text, 26379
    return host.strip("[]"), int(port)


class RedisStore:
    """The Redis servers of one configuration: see the module docstring."""

    def __init__(
        self,
        url: str = "",
        replicas: list[str] | None = None,
        sentinels: list[str] | None = None,
        sentinel_service: str = "mymaster",
        prefix: str = "mg:",
        timeout: float = 0.5,
        retry_max: float = 4.0,
        read_only: bool = False,
    ) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.retry_max = retry_max
        self.read_only = read_only
        self.describe = ""
        kwargs = _client_kwargs(timeout)
        self.master: _Node | None = None
        self.replicas: list[_Node] = []
        if sentinels:
            db, password = 0, None
            if url:
                parts = urlsplit(url)
                db = int(parts.path.strip("/") or 0)
                password = parts.password
            sentinel = Sentinel([_host_port(s) for s in sentinels],
                                sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
                                db=db, password=password, **kwargs)
            self.sentinel = sentinel
            self.master = _Node(f"master of {sentinel_service}", sentinel.master_for(sentinel_service, **kwargs), self)
            # slave_for falls back to the master when no replica is up.
            self.replicas = [_Node(f"replica of {sentinel_service}", sentinel.slave_for(sentinel_service, **kwargs), self)]
            self.describe = f"sentinel {','.join(sentinels)} service {sentinel_service}"
        else:
            if url:
                self.master = _Node(_safe(url), redis.Redis.from_url(url, **kwargs), self)
            for rurl in replicas or []:
                self.replicas.append(_Node(_safe(rurl), redis.Redis.from_url(rurl, **kwargs), self))
            self.describe = ", ".join(n.name for n in ([self.master] if self.master else []) + self.replicas)
        # No server of the configuration answers: one line when it begins, one when it ends.
        # Everything that uses Redis shares this one account of it, so that an outage costs each
        # process two lines whatever uses Redis (learning, hashes, lists).
        self.outage = Outage(f"Redis {self.describe}", log, start=BACKOFF_START, cap=retry_max,
                             meanwhile="its checks report *_TEMPFAIL and lists and maps in Redis keep their last copy")

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: Any) -> "RedisStore | None":
        """The store the configuration describes, or None when Redis is off."""
        url = config.get("redis.url", "") or ""
        replicas = list(config.get("redis.replicas", []) or [])
        sentinels = list(config.get("redis.sentinels", []) or [])
        if not (url or replicas or sentinels):
            return None
        return cls(
            url=url,
            replicas=replicas,
            sentinels=sentinels,
            sentinel_service=config.get("redis.sentinel_service", "mymaster"),
            prefix=config.get("redis.prefix", "mg:"),
            timeout=config.get("redis.timeout", 0.5),
            retry_max=config.get("redis.retry_max", 4.0),
            read_only=bool(config.get("redis.read_only", False)),
        )

    # ------------------------------------------------------------ the API

    def key(self, *parts: Any) -> str:
        """A key under this deployment's prefix: key("bayes", "t", 7) -> "mg:bayes:t:7"."""
        return self.prefix + ":".join(str(p) for p in parts)

    @property
    def can_write(self) -> bool:
        return self.master is not None and not self.read_only

    def reader(self) -> GuardedClient:
        """A client to read from: the first healthy replica, else the master.

        Each call goes to the first server of that list that answers.
        """
        return GuardedClient(self.replicas + ([self.master] if self.master else []))

    def writer(self) -> GuardedClient:
        """A client to the master; RedisReadOnly on a node without one."""
        if not self.can_write:
            raise RedisReadOnly(f"this node has no Redis master to write to ({self.describe})")
        assert self.master is not None
        return GuardedClient([self.master])

    def ping(self) -> bool:
        """True when some server answers; logs the start-up line otherwise."""
        try:
            self.reader().ping()
            return True
        except RedisUnavailable:
            return False


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        return parts._replace(netloc=netloc).geturl()
    return url


_STORES: dict[tuple, RedisStore | None] = {}
_STORES_LOCK = threading.Lock()


def _config_key(config: Any) -> tuple:
    return tuple(
        (k, repr(config.get(k)))
        for k in ("redis.url", "redis.replicas", "redis.sentinels", "redis.sentinel_service",
                  "redis.prefix", "redis.timeout", "redis.retry_max", "redis.read_only")
    )


def configured(config: Any) -> bool:
    """Whether the configuration names a Redis at all (URL, replicas or Sentinels)."""
    from milterguard.settings import redis_configured

    return redis_configured(config)


def get_store(config: Any) -> RedisStore | None:
    """The per-process store for this configuration (None when Redis is off).

    The first call pings Redis, so that a Redis down at start is logged once.
    """
    if not configured(config):
        return None  # Redis off (as from_config says), known without the key: three checks ask per message
    key = _config_key(config)
    with _STORES_LOCK:
        if key in _STORES:
            return _STORES[key]
        store = RedisStore.from_config(config)
        _STORES[key] = store
    if store is not None:
        store.ping()
    return store
