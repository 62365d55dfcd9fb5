"""The DNS layer every check that looks something up goes through.

- One `Resolver` per (nameservers, timeout, cache size) and process: a
  dnspython resolver, a cache that honours TTLs of positive and negative
  answers (bounded, least recently used out first), and a small thread
  pool, created lazily so that pre-forked workers each get their own.
- `Resolver.submit` starts a lookup and returns a future at once; a
  lookup already in flight is shared.  Checks start their lookups at the
  earliest stage that has the data (engine starters) and collect them later.
- `Budget`: one per message (`dns.message_budget`).  Every wait on a
  future of that message takes its time from the same budget, so DNS adds
  at most that much to a message however many checks wait; a check whose
  answer is not back in time emits its *_TEMPFAIL symbol.
- The health of the name servers (`Outage`): when `DOWN_AFTER` queries in
  a row get no answer at all (timeouts, not NXDOMAIN or SERVFAIL, which
  are answers), the servers are taken as away and logged once, by name.
  While they are, a look-up not in the cache answers TIMEOUT at once rather
  than waiting, and one look-up per retry time (4 s at most) goes to the
  servers in the background; the first one answered ends the outage, with
  one line and the count of look-ups failed in between (issue 11).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# dnspython imports an HTTP client for DNS over HTTPS as it loads (0.15 s at start-up);
# milterguard asks its name servers over UDP and TCP only.
try:
    import dns._features

    dns._features.force("doh", False)
except (ImportError, AttributeError):
    pass  # a dnspython without the switch (before 2.5): it loads the client, no harm done
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from milterguard.clients.outage import Outage

log = logging.getLogger("milterguard.dns")

# Answer status values.
OK, NXDOMAIN, NODATA, TIMEOUT, SERVFAIL = "ok", "nxdomain", "nodata", "timeout", "servfail"
_MAX_TTL = 86400
_DEFAULT_NEGATIVE_TTL = 60
# Queries in a row without any answer that make the servers count as away: one query
# may time out on its own (a recursive resolver chasing a dead authority), three with
# nothing answered in between do not.
DOWN_AFTER = 3


class BudgetExceeded(Exception):
    """The message's DNS budget ran out before the answer came back."""


@dataclass
class Answer:
    """The outcome of one query.

    `records` holds text for A/AAAA/PTR/NS/CNAME, `(preference, host)` for
    MX, and a list of bytes strings (the character-strings) for TXT.
    """

    name: str
    rdtype: str
    status: str
    records: list[Any] = field(default_factory=list)
    ttl: int = 0
    error: str = ""
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def temporary(self) -> bool:
        """A failure that may go away: timeout, SERVFAIL, REFUSED."""
        return self.status in (TIMEOUT, SERVFAIL)

    def texts(self) -> list[str]:
        """TXT records as text, each record's strings joined (RFC 7208 3.3)."""
        out = []
        for rec in self.records:
            if isinstance(rec, (list, tuple)):
                out.append(b"".join(rec).decode("utf-8", "replace"))
            else:
                out.append(str(rec))
        return out


class Memo:
    """Values that expire: bounded, least recently used out first, safe across threads.

    As such it keeps results derived from DNS answers (an SPF verdict, say) no
    longer than the shortest TTL of the answers they were made from; `Cache`
    keeps the answers themselves.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: collections.OrderedDict[Any, tuple[float, Any]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def entry(self, key: Any) -> tuple[float, Any] | None:
        """(expiry on the monotonic clock, value), or None when absent or expired."""
        with self._lock:
            item = self._data.get(key)
            if item is not None and time.monotonic() >= item[0]:
                del self._data[key]
                item = None
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item

    def get(self, key: Any) -> Any | None:
        item = self.entry(key)
        return item[1] if item is not None else None

    def put(self, key: Any, value: Any, ttl: float) -> None:
        if self.size <= 0 or ttl <= 0:
            return
        with self._lock:
            self._data[key] = (time.monotonic() + min(ttl, _MAX_TTL), value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Cache(Memo):
    """A bounded TTL cache of answers (negative ones too, not temporary failures)."""

    def get(self, key: tuple[str, str]) -> Answer | None:
        item = self.entry(key)
        if item is None:
            return None
        expires, answer = item
        remaining = max(0, int(expires - time.monotonic()))
        return Answer(answer.name, answer.rdtype, answer.status, answer.records, remaining, answer.error, cached=True)

    def put(self, key: tuple[str, str], answer: Answer, ttl: float | None = None) -> None:
        if answer.temporary:
            return
        super().put(key, answer, answer.ttl if ttl is None else ttl)


class Done:
    """What `submit` gives for an answer already known: the part of a Future the
    checks use (`done`, `result`), without the lock and condition a Future makes."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        return self._value


def parse_nameserver(spec: str) -> tuple[str, int]:
    """`127.0.0.1`, `127.0.0.1:5353`, `::1`, `[::1]:5353` -> (address, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = int(port_text)
    else:
        host, port = spec, 53
    ipaddress.ip_address(host)  # ValueError for anything else
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def _server_label(nameserver: Any) -> str:
    """`127.0.0.1`, `127.0.0.1:5353`, `[::1]:5353`: the notation of `dns.nameservers`."""
    address, port = getattr(nameserver, "address", None), getattr(nameserver, "port", 53)
    if address is None:
        return str(nameserver)
    if port == 53:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _unanswered(exc: dns.resolver.NoNameservers) -> bool:
    """Whether no server sent any response (each failed on the network, none with an rcode)."""
    errors = exc.kwargs.get("errors") or []
    return bool(errors) and all(error[4] is None for error in errors)


def _negative_ttl(response: dns.message.Message | None) -> int:
    # RFC 2308 5: a negative answer lives as long as the SOA's TTL and MINIMUM allow.
    if response is None:
        return _DEFAULT_NEGATIVE_TTL
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return max(0, min(rrset.ttl, rrset[0].minimum))
    return _DEFAULT_NEGATIVE_TTL


def _records(rdtype: str, rrset) -> list[Any]:
    out: list[Any] = []
    for rdata in rrset:
        if rdtype in ("A", "AAAA"):
            out.append(rdata.address)
        elif rdtype == "TXT":
            out.append(list(rdata.strings))
        elif rdtype == "MX":
            out.append((rdata.preference, rdata.exchange.to_text(True)))
        elif rdtype in ("PTR", "NS", "CNAME"):
            out.append(rdata.target.to_text(True))
        else:
            out.append(rdata.to_text())
    return out


class Resolver:
    """Cached, concurrent lookups against the configured name servers."""

    def __init__(self, nameservers: list[str], timeout: float, cache_size: int, workers: int = 16) -> None:
        self.timeout = timeout
        if nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers]
        else:
            self._resolver = dns.resolver.Resolver()  # the system's (/etc/resolv.conf)
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = None  # ours honours negative answers and is bounded
        self.nameservers = [str(ns) for ns in self._resolver.nameservers]
        labels = [_server_label(ns) for ns in self._resolver.nameservers]
        self.server_labels = labels
        self.outage = Outage(f"DNS server{'s' if len(labels) > 1 else ''} {', '.join(labels)}", log)
        self._silent = 0  # queries in a row that got no answer
        self.cache = Cache(cache_size)
        self.memo = Memo(cache_size)
        self.workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], concurrent.futures.Future] = {}
        self.queries = 0

    # ------------------------------------------------------------ lookups

    def lookup(self, name: str, rdtype: str = "A") -> Answer:
        """Look NAME up now (in the calling thread), from the cache when it can."""
        name = name.rstrip(".").lower()
        rdtype = rdtype.upper()
        key = (name, rdtype)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if self.outage.down:
            if self.outage.usable():
                # The retry time: this name goes to the servers in the background, and
                # its answer (if any) ends the outage; no message waits for it.
                self._executor().submit(self._probe, key)
            return Answer(name, rdtype, TIMEOUT, error=f"{self.outage.name} not answering; asked again soon")
        return self._probe(key)

    def _probe(self, key: tuple[str, str]) -> Answer:
        answer = self._query(*key)
        self.cache.put(key, answer)
        return answer

    def _query(self, name: str, rdtype: str) -> Answer:
        answer = self._ask(name, rdtype)
        if answer.status == TIMEOUT or (answer.status == SERVFAIL and answer.error.startswith("unanswered")):
            with self._lock:
                self._silent += 1
                silent = self._silent
            if silent >= DOWN_AFTER or self.outage.down:
                self.outage.failed(f"{silent} queries in a row got no answer within {self.timeout:g}s "
                                   f"(the last: {name} {rdtype})")
        else:
            self._silent = 0
            self.outage.succeeded()
        return answer

    def _ask(self, name: str, rdtype: str) -> Answer:
        self.queries += 1
        try:
            result = self._resolver.resolve(name, rdtype, lifetime=self.timeout, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses() if hasattr(exc, "responses") else {}
            response = next(iter(responses.values()), None) if responses else None
            return Answer(name, rdtype, NXDOMAIN, ttl=_negative_ttl(response))
        except dns.exception.Timeout as exc:
            return Answer(name, rdtype, TIMEOUT, error=str(exc))
        except dns.resolver.NoNameservers as exc:
            return Answer(name, rdtype, SERVFAIL, error=f"unanswered: {exc}" if _unanswered(exc) else str(exc))
        except (dns.resolver.NoRootSOA, dns.resolver.YXDOMAIN, dns.name.LabelTooLong, dns.name.EmptyLabel,
                dns.name.NameTooLong) as exc:
            return Answer(name, rdtype, NXDOMAIN, error=str(exc), ttl=_DEFAULT_NEGATIVE_TTL)
        except dns.exception.DNSException as exc:
            return Answer(name, rdtype, SERVFAIL, error=f"{type(exc).__name__}: {exc}")
        if result.rrset is None:
            return Answer(name, rdtype, NODATA, ttl=_negative_ttl(result.response))
        return Answer(name, rdtype, OK, _records(rdtype, result.rrset), ttl=result.rrset.ttl)

    # ------------------------------------------------------------ concurrency

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # A pre-forked worker must not inherit its parent's pool: threads do not survive fork.
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="dns")
                self._pool_pid = os.getpid()
                self._inflight = {}
            return self._pool

    def submit(self, name: str, rdtype: str = "A") -> concurrent.futures.Future:
        """Start looking NAME up; a future of its Answer.  Cached answers come back done."""
        name = name.rstrip(".").lower()
        rdtype = rdtype.upper()
        key = (name, rdtype)
        cached = self.cache.get(key)
        if cached is not None:
            return Done(cached)
        pool = self._executor()
        with self._lock:
            future = self._inflight.get(key)
            if future is not None:
                return future
            future = pool.submit(self.lookup, name, rdtype)
            self._inflight[key] = future
        future.add_done_callback(lambda f, key=key: self._landed(key, f))
        return future

    def _landed(self, key: tuple[str, str], future: concurrent.futures.Future) -> None:
        with self._lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def call(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        """Run FN (an evaluation that makes several dependent lookups, as SPF does) in the pool."""
        return self._executor().submit(fn, *args)


_RESOLVERS: dict[tuple, Resolver] = {}
_RESOLVERS_LOCK = threading.Lock()


def resolver_for(config) -> Resolver:
    """The process's resolver for CONFIG's DNS settings (one cache per setting set)."""
    key = (tuple(config["dns.nameservers"]), config["dns.timeout"], config["dns.cache_size"], config["dns.workers"])
    with _RESOLVERS_LOCK:
        resolver = _RESOLVERS.get(key)
        if resolver is None:
            resolver = Resolver(list(key[0]), key[1], key[2], key[3])
            _RESOLVERS[key] = resolver
        return resolver


class Budget:
    """The DNS time of one message: every wait takes from the same allowance."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.spent = 0.0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> float:
        return max(0.0, self.total - self.spent)

    def wait(self, future: concurrent.futures.Future) -> Any:
        """The future's result, or BudgetExceeded when the budget runs out first."""
        if future.done():
            return future.result()
        t0 = time.monotonic()
        try:
            return future.result(timeout=self.remaining)
        except concurrent.futures.TimeoutError:
            raise BudgetExceeded(f"no answer within the DNS budget of {self.total:g}s") from None
        finally:
            with self._lock:
                self.spent += time.monotonic() - t0


def session(scan) -> "Session":
    """The DNS session of this message (or of the connection before MAIL FROM)."""
    holder = scan.txn.facts if scan.txn is not None else scan.conn.facts
    sess = holder.dns
    if sess is None:
        sess = holder.dns = Session(resolver_for(scan.config), Budget(scan.config["dns.message_budget"]))
    return sess


class Session:
    """A resolver and the budget of one message, and the lookups started for it."""

    def __init__(self, resolver: Resolver, budget: Budget) -> None:
        self.resolver = resolver
        self.budget = budget
        self.started: dict[Any, concurrent.futures.Future] = {}

    def start(self, name: str, rdtype: str = "A") -> concurrent.futures.Future:
        key = (name.rstrip(".").lower(), rdtype.upper())
        future = self.started.get(key)
        if future is None:
            future = self.started[key] = self.resolver.submit(name, rdtype)
        return future

    def start_call(self, key: Any, fn: Callable, *args: Any) -> concurrent.futures.Future:
        future = self.started.get(key)
        if future is None:
            future = self.started[key] = self.resolver.call(fn, *args)
        return future

    def get(self, name: str, rdtype: str = "A") -> Answer:
        """The answer, waiting within the budget; a TIMEOUT answer when it runs out."""
        try:
            return self.budget.wait(self.start(name, rdtype))
        except BudgetExceeded as exc:
            return Answer(name, rdtype, TIMEOUT, error=str(exc))

    def wait(self, future: concurrent.futures.Future) -> Any:
        return self.budget.wait(future)


def enabled(config) -> bool:
    return bool(config["dns.enabled"])
