"""The quarantine: messages held for review, with their envelope and verdict.

One interface, two backends chosen by `quarantine.url`: SQLite (`sqlite:///PATH`,
a file of this node, the default) and PostgreSQL (`postgresql://...`, shared by
several filter nodes and the console).  Both go through SQLAlchemy Core, so
that no SQL is written twice.  The schema is versioned (table
`schema_version`) and upgraded when the store is opened.

What is kept per message: the bytes as the filter would have passed them on
(its own headers added), the envelope (client, HELO, sender, every
recipient), queue id, node, time, score, action, the symbols with their
options, the explanation `scan --explain` prints, and Subject and From for
search.  Releases and deletions are recorded in `events`.

A quarantine is other people's mail: the SQLite file is created 0600 in a
directory created 0700 (SQLite gives its -wal and -shm files the file's mode).
Every failure of the database or the disk is raised as QuarantineError.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from sqlalchemy import (BigInteger, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        create_engine, delete, event, exists, func, insert, select, update)
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from milterguard.mail.raw import header_bytes, split_message
from milterguard.stores import sqlshared
from milterguard.settings import node_name

log = logging.getLogger("milterguard.quarantine")

SCHEMA_VERSION = 1

# Ten characters of a base32 alphabet without 0, 1, l and o: 50 random bits,
# nothing to mistype and nothing a shell or a URL would change.
ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
ID_LENGTH = 10

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

messages = Table(
    "messages", metadata,
    Column("id", String(16), primary_key=True),
    Column("received_at", Float, nullable=False),
    Column("node", String(255), nullable=False, default=""),
    Column("queue_id", String(64), nullable=False, default=""),
    Column("client_ip", String(64), nullable=False, default=""),
    Column("client_name", String(255), nullable=False, default=""),
    Column("helo", String(255), nullable=False, default=""),
    Column("sender", Text, nullable=False, default=""),
    Column("sender_key", String(320), nullable=False, default=""),  # lower case, for search
    Column("mail_params", Text, nullable=False, default="{}"),  # JSON: ESMTP parameters of MAIL FROM
    Column("subject", Text, nullable=False, default=""),
    Column("from_header", Text, nullable=False, default=""),
    Column("score", Float, nullable=False, default=0.0),
    Column("action", String(16), nullable=False, default="review"),
    Column("symbols", Text, nullable=False, default="[]"),  # JSON: [{name, weight, options}]
    Column("explain", Text, nullable=False, default=""),
    Column("size", BigInteger, nullable=False, default=0),
)
Index("messages_received_at", messages.c.received_at)
Index("messages_sender_key", messages.c.sender_key)

recipients = Table(
    "recipients", metadata,
    Column("message_id", String(16), nullable=False),
    Column("address", Text, nullable=False),
    Column("address_key", String(320), nullable=False),  # lower case, for search
    Column("released_at", Float, nullable=True),
    Column("released_by", String(255), nullable=True),
    Column("received_at", Float, nullable=False),  # the message's, so that the index gives a page in order
)
Index("recipients_message", recipients.c.message_id)
Index("recipients_address", recipients.c.address_key, recipients.c.received_at)

symbols = Table(
    "symbols", metadata,
    Column("message_id", String(16), nullable=False),
    Column("symbol", String(128), nullable=False),
    Column("received_at", Float, nullable=False),  # as in recipients
)
Index("symbols_symbol", symbols.c.symbol, symbols.c.received_at)
Index("symbols_message", symbols.c.message_id)

bodies = Table(
    "bodies", metadata,
    Column("message_id", String(16), primary_key=True),
    Column("raw", LargeBinary, nullable=False),
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(16), nullable=False),
    Column("at", Float, nullable=False),
    Column("kind", String(16), nullable=False),  # release, delete, learn
    Column("who", String(255), nullable=False, default=""),
    Column("detail", Text, nullable=False, default=""),
)
Index("events_message", events.c.message_id)


def _upgrade_to_1(conn) -> None:
    for table in (messages, recipients, symbols, bodies, events):
        table.create(conn, checkfirst=True)
    for index in (*messages.indexes, *recipients.indexes, *symbols.indexes, *events.indexes):
        index.create(conn, checkfirst=True)


# version -> the step that brings the schema from version - 1 to it
UPGRADES: dict[int, Callable] = {1: _upgrade_to_1}

# pg_advisory_xact_lock key: nodes that start together upgrade one after the other.
_PG_UPGRADE_LOCK = 0x6D6771756172


class QuarantineError(Exception):
    """The store failed (database down, disk full, ...) or refused the request."""


class NotFound(QuarantineError):
    """No message with that id."""


class AlreadyReleased(QuarantineError):
    """A release of recipients already released, without force."""

    def __init__(self, message_id: str, rcpts: list[str]) -> None:
        super().__init__(f"{message_id} was already released to {', '.join(rcpts)} (--force releases it again)")
        self.rcpts = rcpts


def new_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


@dataclass
class Held:
    """One stored message, without its bytes (`Quarantine.raw` reads those)."""

    sender: str
    rcpts: list[str]
    client_ip: str = ""
    client_name: str = ""
    helo: str = ""
    queue_id: str = ""
    node: str = ""
    mail_params: dict = field(default_factory=dict)
    subject: str = ""
    from_header: str = ""
    score: float = 0.0
    action: str = "review"
    symbols: list[dict] = field(default_factory=list)  # {"name", "weight", "options"}
    explain: str = ""
    size: int = 0
    received_at: float = 0.0
    id: str = ""
    released: dict[str, tuple[float, str]] = field(default_factory=dict)  # recipient -> (time, by whom)

    def as_dict(self) -> dict:
        """The record as `quarantine list --json` prints it."""
        return {
            "id": self.id, "time": self.received_at,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.received_at)),
            "node": self.node, "queue_id": self.queue_id, "client": self.client_ip, "client_name": self.client_name,
            "helo": self.helo, "from": self.sender, "rcpts": self.rcpts, "header_from": self.from_header,
            "subject": self.subject, "score": self.score, "action": self.action,
            "symbols": self.symbols, "size": self.size,
            "released": {rcpt: {"time": at, "by": who} for rcpt, (at, who) in self.released.items()},
        }


@dataclass
class Query:
    """Filters of `Quarantine.list`; each None or empty is no filter."""

    rcpt: str = ""
    sender: str = ""  # envelope sender or header From
    since: float | None = None  # epoch seconds
    symbol: str = ""
    min_score: float | None = None
    limit: int = 100


def engine_url(url: str):
    """The SQLAlchemy URL for a `quarantine.url`: postgresql:// goes through psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise QuarantineError(f"quarantine.url {url!r}: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername not in ("sqlite", "postgresql+psycopg"):
        raise QuarantineError(f"quarantine.url {url!r}: expected sqlite:///PATH or postgresql://...")
    if parsed.drivername == "sqlite" and not parsed.database:
        raise QuarantineError(f"quarantine.url {url!r}: no file (sqlite:////var/lib/milterguard/quarantine.db)")
    return parsed


def _private_sqlite_file(path: str) -> None:
    """Create the directory (0700) and the file (0600) before SQLite does, with the mode of a quarantine.

    An existing file is never opened here: closing any descriptor of a database file drops
    every POSIX lock this process holds on it, those of SQLite's open connections included,
    and other processes then write over them (a corrupt database, SIGBUS on the -shm map).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)  # another thread may make it at the same time
        os.chmod(directory, 0o700)  # whatever the umask
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))  # new: nobody has it open
    except FileExistsError:
        pass
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)


class _SQLiteWithoutFunctions(SQLiteDialect_pysqlite):
    """pysqlite without the Python functions SQLAlchemy adds to every connection (regexp, floor).

    Closing a connection frees those functions from C, which takes the GIL afresh; under
    the milter, whose sessions run Python on libmilter's threads, that crashed workers
    (SIGSEGV, SIGBUS, "take_gil: PyMUTEX_LOCK(gil->mutex) failed") as soon as two
    sessions stored at once.  The quarantine's queries use neither function.
    """

    supports_statement_cache = True

    def on_connect(self):
        return None


registry.register("sqlite.milterguard", __name__, "_SQLiteWithoutFunctions")


def _sqlite_engine(url) -> Engine:
    _private_sqlite_file(url.database)
    # A connection per use: a worker holds no file open between messages, so that a
    # file restored or moved back in place is used at once.
    engine = create_engine(url.set(drivername="sqlite+milterguard"), poolclass=NullPool,
                           connect_args={"timeout": 10})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below opens the transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) do not block the filter's writes
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Take the write lock at the start, so that two workers never both read and then
        # both fail to write (SQLITE_BUSY cannot be waited out inside a deferred transaction).
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def open_quarantine(config) -> "Quarantine":
    """The quarantine named by `quarantine.url`, its schema brought up to date."""
    return Quarantine(config["quarantine.url"], node=node_name(config))


class Quarantine:
    """The quarantine store; every method raises QuarantineError on failure."""

    def __init__(self, url: str, node: str = "") -> None:
        self.url = engine_url(url)
        self.node = node or socket.gethostname()
        try:
            if self.url.drivername == "sqlite":
                self.engine = _sqlite_engine(self.url)
            else:
                self.engine = create_engine(self.url, pool_pre_ping=True, pool_size=2, max_overflow=4,
                                            connect_args={"connect_timeout": 5})
            self._upgrade()
        except (SQLAlchemyError, OSError) as exc:
            raise QuarantineError(sqlshared.why(exc)) from exc

    @property
    def backend(self) -> str:
        return "sqlite" if self.url.drivername == "sqlite" else "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    def _upgrade(self) -> None:
        sqlshared.upgrade(self.engine, schema_version, UPGRADES, SCHEMA_VERSION, _PG_UPGRADE_LOCK, "quarantine",
                          QuarantineError)

    def schema_version(self) -> int:
        return self._run(lambda conn: conn.execute(select(schema_version.c.version)).scalar())

    def _run(self, work: Callable):
        """WORK(connection) in one transaction; database and disk failures become QuarantineError."""
        return sqlshared.run(self.engine, work, QuarantineError)

    # ------------------------------------------------------------ storing

    def add(self, held: Held, raw: bytes) -> str:
        """Store RAW with what HELD says of it; returns the new id."""
        held.id = held.id or new_id()
        held.received_at = held.received_at or time.time()
        held.node = held.node or self.node
        held.size = len(raw)

        def work(conn) -> str:
            conn.execute(insert(messages).values(_message_row(held)))
            conn.execute(insert(recipients), [_rcpt_row(held, rcpt) for rcpt in held.rcpts])
            names = sorted({s["name"] for s in held.symbols})
            if names:
                conn.execute(insert(symbols), [{"message_id": held.id, "symbol": name, "received_at": held.received_at}
                                               for name in names])
            conn.execute(insert(bodies).values(message_id=held.id, raw=raw))
            return held.id

        return self._run(work)

    # ------------------------------------------------------------ reading

    def list(self, query: Query) -> list[Held]:
        """Messages matching QUERY, newest first."""
        # The recipient (else the symbol) drives: its index, (key, received_at), yields the
        # newest first, so that a page of a recipient with 100,000 messages reads 100 rows.
        rcpt_match = recipients.c.address_key == query.rcpt.lower()
        symbol_match = symbols.c.symbol == query.symbol.upper()
        if query.rcpt:
            driver = recipients
            stmt = select(messages).join(recipients, recipients.c.message_id == messages.c.id).where(rcpt_match)
        elif query.symbol:
            driver = symbols
            stmt = select(messages).join(symbols, symbols.c.message_id == messages.c.id).where(symbol_match)
        else:
            driver = messages
            stmt = select(messages)
        stmt = stmt.order_by(driver.c.received_at.desc(), messages.c.id).limit(query.limit)
        if query.rcpt and query.symbol:
            stmt = stmt.where(exists().where(symbols.c.message_id == messages.c.id, symbol_match))
        if query.sender:
            key = query.sender.lower()
            stmt = stmt.where((messages.c.sender_key == key) | messages.c.from_header.contains(query.sender))
        if query.since is not None:
            stmt = stmt.where(driver.c.received_at >= query.since)
        if query.min_score is not None:
            stmt = stmt.where(messages.c.score >= query.min_score)

        def work(conn) -> list[Held]:
            rows = conn.execute(stmt).mappings().all()
            return self._with_rcpts(conn, rows)

        return self._run(work)

    def _with_rcpts(self, conn, rows) -> list[Held]:
        found = [_held(row) for row in rows]
        by_id = {held.id: held for held in found}
        for start in range(0, len(found), 500):
            ids = [held.id for held in found[start:start + 500]]
            for row in conn.execute(select(recipients).where(recipients.c.message_id.in_(ids))):
                held = by_id[row.message_id]
                held.rcpts.append(row.address)
                if row.released_at is not None:
                    held.released[row.address] = (row.released_at, row.released_by or "")
        return found

    def get(self, message_id: str) -> Held:
        def work(conn) -> Held:
            rows = conn.execute(select(messages).where(messages.c.id == message_id)).mappings().all()
            if not rows:
                raise NotFound(f"no message {message_id!r} in the quarantine")
            return self._with_rcpts(conn, rows)[0]

        return self._run(work)

    def raw(self, message_id: str) -> bytes:
        def work(conn) -> bytes:
            raw = conn.execute(select(bodies.c.raw).where(bodies.c.message_id == message_id)).scalar()
            if raw is None:
                raise NotFound(f"no message {message_id!r} in the quarantine")
            return bytes(raw)

        return self._run(work)

    def events(self, message_id: str) -> list[dict]:
        stmt = select(events).where(events.c.message_id == message_id).order_by(events.c.id)
        return self._run(lambda conn: [dict(row) for row in conn.execute(stmt).mappings()])

    # ------------------------------------------------------------ release, delete, expire

    def release(self, message_id: str, send: Callable[[Held, bytes, list[str]], Iterable[str]], *,
                rcpts: Iterable[str] = (), who: str = "", force: bool = False) -> list[str]:
        """Mark the recipients released, then SEND(held, raw, recipients), which returns those the
        server refused; returns the recipients released.

        The mark is taken first, in one transaction, so that two releases at once do not both
        send; when SEND fails, or for the recipients it refused, the mark is taken back.
        Recipients released before need FORCE.
        """
        wanted = {r.lower() for r in rcpts}
        now = time.time()

        def claim(conn) -> tuple[list[str], dict]:
            rows = conn.execute(select(recipients).where(recipients.c.message_id == message_id)
                                .with_for_update()).all()
            if not rows:
                raise NotFound(f"no message {message_id!r} in the quarantine")
            unknown = wanted - {row.address_key for row in rows}
            if unknown:
                raise QuarantineError(f"{message_id} has no recipient {', '.join(sorted(unknown))}")
            chosen = [row for row in rows if not wanted or row.address_key in wanted]
            again = [row.address for row in chosen if row.released_at is not None]
            if again and not force:
                raise AlreadyReleased(message_id, again)
            before = {row.address_key: (row.released_at, row.released_by) for row in chosen}
            conn.execute(update(recipients)
                         .where(recipients.c.message_id == message_id,
                                recipients.c.address_key.in_([row.address_key for row in chosen]))
                         .values(released_at=now, released_by=who))
            return [row.address for row in chosen], before

        def unclaim(keys: Iterable[str]) -> None:
            self._run(lambda conn: [conn.execute(update(recipients).where(
                recipients.c.message_id == message_id, recipients.c.address_key == key)
                .values(released_at=before[key][0], released_by=before[key][1])) for key in keys])

        chosen, before = self._run(claim)
        try:
            refused = {rcpt.lower() for rcpt in send(self.get(message_id), self.raw(message_id), chosen)}
        except BaseException:  # noqa: BLE001 - whatever stopped the sending, the mark goes back; re-raised
            unclaim(before)
            raise
        if refused:
            unclaim(refused & set(before))
            chosen = [rcpt for rcpt in chosen if rcpt.lower() not in refused]
        self._run(lambda conn: conn.execute(insert(events).values(
            message_id=message_id, at=now, kind="release", who=who,
            detail=json.dumps({"rcpts": chosen, "force": force}))))
        return chosen

    def note(self, message_id: str, kind: str, who: str = "", detail: str = "") -> None:
        """Record an event of the message (such as `learn`) beside its releases and deletion."""
        self._run(lambda conn: conn.execute(insert(events).values(
            message_id=message_id, at=time.time(), kind=kind, who=who, detail=detail)))

    def delete(self, message_id: str, who: str = "") -> None:
        def work(conn) -> None:
            if not conn.execute(select(messages.c.id).where(messages.c.id == message_id)).first():
                raise NotFound(f"no message {message_id!r} in the quarantine")
            _delete_ids(conn, [message_id])
            conn.execute(insert(events).values(message_id=message_id, at=time.time(), kind="delete", who=who))

        self._run(work)

    def expire(self, retention_days: int, max_size: int = 0, now: float | None = None) -> tuple[int, int]:
        """Remove what was stored more than RETENTION_DAYS ago, then the oldest until the
        total is at most MAX_SIZE (0: no cap); returns (messages, bytes) removed."""
        cutoff = (now or time.time()) - retention_days * 86400.0

        def work(conn) -> tuple[int, int]:
            rows = conn.execute(select(messages.c.id, messages.c.size, messages.c.received_at)
                                .order_by(messages.c.received_at, messages.c.id)).all()
            total = sum(row.size for row in rows)
            doomed, freed = [], 0
            for row in rows:
                if row.received_at >= cutoff and not (max_size and total - freed > max_size):
                    break
                doomed.append(row.id)
                freed += row.size
            _delete_ids(conn, doomed)
            return len(doomed), freed

        count, freed = self._run(work)
        if count:
            log.info("quarantine expire: removed %d messages (%d bytes): older than %d days or past the %d byte cap",
                     count, freed, retention_days, max_size)
        return count, freed

    def size(self) -> tuple[int, int]:
        """(messages, bytes) held: one query, for the metrics' regular poll."""
        def work(conn) -> tuple[int, int]:
            count, size = conn.execute(select(func.count(messages.c.id),
                                              func.coalesce(func.sum(messages.c.size), 0))).one()
            return int(count), int(size)

        return self._run(work)

    def stats(self) -> dict:
        def work(conn) -> dict:
            count, size, oldest, newest = conn.execute(select(
                func.count(messages.c.id), func.coalesce(func.sum(messages.c.size), 0),
                func.min(messages.c.received_at), func.max(messages.c.received_at))).one()
            released = conn.execute(select(func.count(func.distinct(recipients.c.message_id)))
                                    .where(recipients.c.released_at.is_not(None))).scalar()
            nodes = dict(conn.execute(select(messages.c.node, func.count()).group_by(messages.c.node)).all())
            top = conn.execute(select(symbols.c.symbol, func.count().label("n")).group_by(symbols.c.symbol)
                               .order_by(func.count().desc(), symbols.c.symbol).limit(10)).all()
            return {"backend": self.backend, "schema_version": SCHEMA_VERSION, "messages": count,
                    "bytes": int(size), "oldest": oldest, "newest": newest, "released": released,
                    "nodes": nodes, "top_symbols": dict(top)}

        return self._run(work)


def as_received(held: Held, raw: bytes) -> bytes:
    """RAW with its Subject as the client sent it (without the Subject tag), for learning: the
    message digest and the tokens then match what the filter scanned and autolearn learned.
    The headers milterguard added stay; neither the digest nor the tokens read them."""
    headers, body = split_message(raw)
    at = next((i for i, (name, _value) in enumerate(headers) if name.lower() == "subject"), None)
    if at is not None:
        headers[at] = (headers[at][0], held.subject)
    return header_bytes(headers) + body


def _delete_ids(conn, ids: list[str]) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for table, column in ((bodies, bodies.c.message_id), (symbols, symbols.c.message_id),
                              (recipients, recipients.c.message_id), (messages, messages.c.id)):
            conn.execute(delete(table).where(column.in_(chunk)))


def _message_row(held: Held) -> dict:
    return {
        "id": held.id, "received_at": held.received_at, "node": held.node, "queue_id": held.queue_id,
        "client_ip": held.client_ip, "client_name": held.client_name, "helo": held.helo,
        "sender": held.sender, "sender_key": held.sender.lower()[:320],
        "mail_params": json.dumps(held.mail_params), "subject": held.subject, "from_header": held.from_header,
        "score": held.score, "action": held.action, "symbols": json.dumps(held.symbols, ensure_ascii=False),
        "explain": held.explain, "size": held.size,
    }


def _rcpt_row(held: Held, rcpt: str) -> dict:
    return {"message_id": held.id, "address": rcpt, "address_key": rcpt.lower()[:320], "received_at": held.received_at}


def _held(row) -> Held:
    return Held(
        id=row["id"], received_at=row["received_at"], node=row["node"], queue_id=row["queue_id"],
        client_ip=row["client_ip"], client_name=row["client_name"], helo=row["helo"], sender=row["sender"],
        mail_params=json.loads(row["mail_params"] or "{}"), subject=row["subject"], from_header=row["from_header"],
        score=row["score"], action=row["action"], symbols=json.loads(row["symbols"] or "[]"),
        explain=row["explain"], size=row["size"], rcpts=[],
    )
