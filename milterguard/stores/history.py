"""The history of verdicts: one row per message the filter judged (no bodies), and the health
each filter process reports of its dependencies, for the web console.

Kept in the quarantine's database (`quarantine.url`), beside the quarantine, with its own
schema version (`history_schema_version`) and its own retention (`history.retention_days`).

Rows are written by a thread of each filter process (`Recorder`), a batch at a time, so
that the mail path only puts a dict in a bounded queue: a database that is slow or down
costs a message nothing.  While it is down the rows are dropped and counted, and the log
says so once (clients/outage.py).  Counts per five minutes and action, and per hour and
symbol, are kept up to date with each batch, so that the overview and the symbols page
read a few thousand rows, not the whole history.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import time
from typing import Callable, Iterable

from sqlalchemy import (Column, Float, Index, Integer, MetaData, String, Table, Text, delete, func, insert, select)
from sqlalchemy.engine import Engine

from milterguard.clients.outage import Outage, known
from milterguard.stores import sqlshared

log = logging.getLogger("milterguard.history")

SCHEMA_VERSION = 1
BUCKET = 300  # seconds per row of action_counts
QUEUE_MAX = 10000  # rows waiting to be written in one process; past it they are dropped
BATCH_MAX = 500
GATHER = 1.0  # seconds a batch waits for more rows after its first
STATUS_EVERY = 10.0  # seconds between two health reports of a process

metadata = MetaData()
version = sqlshared.version_table(metadata, "history_schema_version")

history = Table(
    "history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("node", String(255), nullable=False, default=""),
    Column("queue_id", String(64), nullable=False, default=""),
    Column("client_ip", String(64), nullable=False, default=""),
    Column("client_name", String(255), nullable=False, default=""),
    Column("sender", Text, nullable=False, default=""),
    Column("rcpts", Text, nullable=False, default=""),  # comma separated
    Column("subject", Text, nullable=False, default=""),
    Column("score", Float, nullable=False, default=0.0),
    Column("action", String(16), nullable=False, default=""),
    Column("symbols", Text, nullable=False, default="[]"),  # JSON: [{name, weight, options}]
    Column("explain", Text, nullable=False, default=""),
)
# Rows are numbered as they are written, so the newest first is the id's order, read from
# the primary key; an action or a symbol reads its own index in that order.
Index("history_at", history.c.at)
Index("history_action_id", history.c.action, history.c.id)

# What a text search reads, apart from the wide rows (explanations): a scan of this table
# from the newest row stops at the first page of matches.
history_text = Table(
    "history_text", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # the row's id in history
    Column("action", String(16), nullable=False),
    Column("text", Text, nullable=False),  # lower case: sender, recipients, Subject, queue id, client
)

history_symbols = Table(
    "history_symbols", metadata,
    Column("history_id", Integer, nullable=False),
    Column("symbol", String(128), nullable=False),
    Column("at", Float, nullable=False),
)
Index("history_symbols_symbol", history_symbols.c.symbol, history_symbols.c.history_id)
Index("history_symbols_id", history_symbols.c.history_id)

action_counts = Table(
    "history_action_counts", metadata,
    Column("bucket", Integer, primary_key=True),  # at // BUCKET
    Column("action", String(16), primary_key=True),
    Column("count", Integer, nullable=False),
)

action_hours = Table(  # the same per hour: the day and the week read 24 or 168 rows an action
    "history_action_hours", metadata,
    Column("bucket", Integer, primary_key=True),  # at // 3600
    Column("action", String(16), primary_key=True),
    Column("count", Integer, nullable=False),
)

symbol_counts = Table(
    "history_symbol_counts", metadata,
    Column("hour", Integer, primary_key=True),  # at // 3600
    Column("symbol", String(128), primary_key=True),
    Column("count", Integer, nullable=False),
)

node_status = Table(
    "node_status", metadata,
    Column("node", String(255), primary_key=True),
    Column("pid", Integer, primary_key=True),
    Column("updated_at", Float, nullable=False),
    Column("health", Text, nullable=False, default="[]"),  # JSON: [{name, up, since, failures}]
    Column("dropped", Integer, nullable=False, default=0),  # history rows this process could not write
)


def _upgrade_to_1(conn) -> None:
    for table in (history, history_text, history_symbols, action_counts, action_hours, symbol_counts, node_status):
        table.create(conn, checkfirst=True)
    for index in (*history.indexes, *history_symbols.indexes):
        index.create(conn, checkfirst=True)


UPGRADES = {1: _upgrade_to_1}
_PG_UPGRADE_LOCK = 0x6D6768697374


class HistoryError(Exception):
    """The history's database failed or refused the request."""


def row(*, at: float, node: str, queue_id: str, client_ip: str, client_name: str, sender: str,
        rcpts: Iterable[str], subject: str, score: float, action: str, symbols: list[dict], explain: str) -> dict:
    """One message's row, as the filter records it."""
    rcpts = list(rcpts)
    return {"at": at, "node": node, "queue_id": queue_id, "client_ip": client_ip, "client_name": client_name,
            "sender": sender, "rcpts": ",".join(rcpts), "subject": subject, "score": round(score, 3),
            "action": action, "symbols": json.dumps(symbols, ensure_ascii=False), "explain": explain}


def _text(r: dict) -> str:
    return " ".join((r["sender"], r["rcpts"].replace(",", " "), r["subject"], r["queue_id"], r["client_ip"],
                     r["client_name"])).lower()


def _upsert(conn, table, keys: tuple[str, ...], counts: dict[tuple, int]) -> None:
    if not counts:
        return
    values = [{**dict(zip(keys, key)), "count": n} for key, n in counts.items()]
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    stmt = dialect_insert(table)
    stmt = stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={"count": table.c.count + stmt.excluded["count"]})
    conn.execute(stmt, values)


class History:
    """The history of verdicts in ENGINE's database; every method raises HistoryError."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        sqlshared.upgrade(engine, version, UPGRADES, SCHEMA_VERSION, _PG_UPGRADE_LOCK, "history", HistoryError)

    @classmethod
    def open(cls, config) -> "History":
        return cls(sqlshared.open_engine(config, HistoryError))

    def _run(self, work):
        return sqlshared.run(self.engine, work, HistoryError)

    # ------------------------------------------------------------ writing

    def add_many(self, rows: list[dict]) -> None:
        """Store ROWS (made by `row`) and count them per bucket, action, hour and symbol."""
        if not rows:
            return
        per_action: dict[tuple, int] = {}
        per_hour: dict[tuple, int] = {}
        per_symbol: dict[tuple, int] = {}
        for r in rows:
            key = (int(r["at"] // BUCKET), r["action"])
            per_action[key] = per_action.get(key, 0) + 1
            key = (int(r["at"] // 3600), r["action"])
            per_hour[key] = per_hour.get(key, 0) + 1
            for name in {s["name"] for s in json.loads(r["symbols"])}:
                key = (int(r["at"] // 3600), name)
                per_symbol[key] = per_symbol.get(key, 0) + 1

        def work(conn) -> None:
            # One statement for the batch; the ids come back in the order of the rows.
            ids = conn.execute(insert(history).returning(history.c.id, sort_by_parameter_order=True),
                               rows).scalars().all()
            conn.execute(insert(history_text), [{"id": ident, "action": r["action"], "text": _text(r)}
                                                for ident, r in zip(ids, rows)])
            marks = [{"history_id": ident, "symbol": name, "at": r["at"]} for ident, r in zip(ids, rows)
                     for name in sorted({s["name"] for s in json.loads(r["symbols"])})]
            if marks:
                conn.execute(insert(history_symbols), marks)
            _upsert(conn, action_counts, ("bucket", "action"), per_action)
            _upsert(conn, action_hours, ("bucket", "action"), per_hour)
            _upsert(conn, symbol_counts, ("hour", "symbol"), per_symbol)

        self._run(work)

    def report_status(self, node: str, pid: int, health: list[dict], dropped: int) -> None:
        def work(conn) -> None:
            conn.execute(delete(node_status).where(node_status.c.node == node, node_status.c.pid == pid))
            conn.execute(insert(node_status).values(node=node, pid=pid, updated_at=time.time(),
                                                    health=json.dumps(health), dropped=dropped))

        self._run(work)

    def expire(self, retention_days: int, now: float | None = None) -> int:
        """Remove rows (and counts) older than RETENTION_DAYS, and reports of processes silent for a day."""
        now = now or time.time()
        cutoff = now - retention_days * 86400.0

        def work(conn) -> int:
            conn.execute(delete(history_text).where(history_text.c.id.in_(
                select(history.c.id).where(history.c.at < cutoff))))
            gone = conn.execute(delete(history).where(history.c.at < cutoff)).rowcount
            conn.execute(delete(history_symbols).where(history_symbols.c.at < cutoff))
            conn.execute(delete(action_counts).where(action_counts.c.bucket < int(cutoff // BUCKET)))
            conn.execute(delete(action_hours).where(action_hours.c.bucket < int(cutoff // 3600)))
            conn.execute(delete(symbol_counts).where(symbol_counts.c.hour < int(cutoff // 3600)))
            conn.execute(delete(node_status).where(node_status.c.updated_at < now - 86400))
            return gone

        return self._run(work)

    # ------------------------------------------------------------ reading

    def search(self, text: str = "", action: str = "", symbol: str = "", limit: int = 50,
               before: int | None = None) -> list[dict]:
        """The newest rows matching: TEXT in sender, recipients, Subject, queue id or client;
        ACTION; SYMBOL.  BEFORE (the id of the last row of a page) pages back."""
        cols = (history.c.id, history.c.at, history.c.node, history.c.queue_id, history.c.client_ip,
                history.c.client_name, history.c.sender, history.c.rcpts, history.c.subject,
                history.c.score, history.c.action, history.c.symbols)
        has_symbol = history_symbols.c.symbol == symbol.upper()
        if text:
            # The narrow table drives, newest first; the wide rows are read for one page only.
            key = history_text.c.id
            ids = select(key).where(history_text.c.text.contains(text.lower(), autoescape=True))
            if action:
                ids = ids.where(history_text.c.action == action)
            if symbol:
                ids = ids.where(select(history_symbols.c.history_id).where(
                    history_symbols.c.history_id == key, has_symbol).exists())
        elif symbol:
            key = history_symbols.c.history_id
            ids = select(key).where(has_symbol)
            if action:
                ids = ids.join(history, history.c.id == key).where(history.c.action == action)
        else:
            key = history.c.id
            ids = select(key)
            if action:
                ids = ids.where(history.c.action == action)
        if before is not None:
            ids = ids.where(key < before)
        ids = ids.order_by(key.desc()).limit(limit)

        def work(conn) -> list[dict]:
            wanted = conn.execute(ids).scalars().all()
            if not wanted:
                return []
            stmt = select(*cols).where(history.c.id.in_(wanted)).order_by(history.c.id.desc())
            return [_decoded(dict(r)) for r in conn.execute(stmt).mappings()]

        return self._run(work)

    def get(self, ident: int) -> dict | None:
        def work(conn):
            found = conn.execute(select(history).where(history.c.id == ident)).mappings().first()
            return _decoded(dict(found)) if found else None

        return self._run(work)

    def action_series(self, since: float, step: int, now: float | None = None, conn=None) -> dict:
        """Messages per action in buckets of STEP seconds (a multiple of BUCKET; of an hour, read from the
        hourly counts) since SINCE:
        {"starts": [...], "actions": {action: [count, ...]}}."""
        now = now or time.time()
        first = int(since // step) * step
        starts = list(range(first, int(now) + 1, step))
        table, width = (action_hours, 3600) if step % 3600 == 0 else (action_counts, BUCKET)
        per = max(1, step // width)
        slot = (table.c.bucket - int(first // width)) / per
        if self.engine.dialect.name != "sqlite":
            slot = func.floor(slot)
        slot = slot.label("slot")
        stmt = (select(slot, table.c.action, func.sum(table.c.count))
                .where(table.c.bucket >= int(first // width))
                .group_by(slot, table.c.action))
        series: dict[str, list[int]] = {}
        rows = conn.execute(stmt).all() if conn is not None else self._run(lambda c: c.execute(stmt).all())
        for at, action, count in rows:
            at = int(at)
            if 0 <= at < len(starts):
                series.setdefault(action, [0] * len(starts))[at] += int(count)
        return {"starts": starts, "actions": series}

    def top_symbols(self, since: float = 0.0, limit: int = 0, conn=None) -> list[tuple[str, int]]:
        """(symbol, messages) since SINCE, most frequent first (LIMIT 0: all)."""
        total = func.sum(symbol_counts.c.count)
        stmt = (select(symbol_counts.c.symbol, total).where(symbol_counts.c.hour >= int(since // 3600))
                .group_by(symbol_counts.c.symbol).order_by(total.desc(), symbol_counts.c.symbol))
        if limit:
            stmt = stmt.limit(limit)
        rows = conn.execute(stmt).all() if conn is not None else self._run(lambda c: c.execute(stmt).all())
        return [(name, int(n)) for name, n in rows]

    def count_since(self, since: float, conn=None) -> int:
        stmt = select(func.coalesce(func.sum(action_counts.c.count), 0)).where(
            action_counts.c.bucket >= int(since // BUCKET))
        return int(conn.execute(stmt).scalar() if conn is not None else self._run(lambda c: c.execute(stmt).scalar()))

    def overview(self, seconds: int, step: int, now: float | None = None) -> dict:
        """What the overview shows, read in one transaction."""
        now = now or time.time()

        def work(conn) -> dict:
            return {"series": self.action_series(now - seconds, step, now, conn),
                    "top": self.top_symbols(now - seconds, 15, conn),
                    "last_hour": self.count_since(now - 3600, conn),
                    "nodes": self.nodes(conn=conn)}

        return self._run(work)

    def nodes(self, fresh: float = 60.0, conn=None) -> list[dict]:
        """Per node: its processes that reported within FRESH seconds and each dependency's health
        (down when any of them says so), and the history rows they could not write."""
        stmt = select(node_status).order_by(node_status.c.node)
        rows = conn.execute(stmt).mappings().all() if conn is not None else \
            self._run(lambda c: c.execute(stmt).mappings().all())
        now = time.time()
        nodes: dict[str, dict] = {}
        for r in rows:
            node = nodes.setdefault(r["node"], {"node": r["node"], "processes": 0, "stale": 0, "updated_at": 0.0,
                                                "dependencies": {}, "dropped": 0})
            node["updated_at"] = max(node["updated_at"], r["updated_at"])
            if now - r["updated_at"] > fresh:
                node["stale"] += 1
                continue
            node["processes"] += 1
            node["dropped"] += r["dropped"]
            for dep in json.loads(r["health"]):
                known = node["dependencies"].setdefault(dep["name"], {"name": dep["name"], "up": True, "since": None})
                if not dep["up"]:
                    known["up"] = False
                    known["since"] = dep.get("since")
        return [dict(n, dependencies=sorted(n["dependencies"].values(), key=lambda d: d["name"]))
                for n in nodes.values()]


def _decoded(r: dict) -> dict:
    r["symbols"] = json.loads(r["symbols"] or "[]")
    r["rcpts"] = [x for x in (r["rcpts"] or "").split(",") if x]
    return r


def health() -> list[dict]:
    """Each dependency this process watches (clients/outage.py): up, or down since when."""
    now, wall = time.monotonic(), time.time()
    return [{"name": o.name, "up": not o.down, "failures": o.failures,
             "since": wall - (now - o.down_since) if o.down else None} for o in sorted(known(), key=lambda o: o.name)]


class Recorder:
    """The filter process's writer of history rows: `record` queues, a thread writes.

    Made after the fork (one per process); nothing here ever raises into the mail path."""

    def __init__(self, config, node: str, engine: Callable[[], Engine] | None = None) -> None:
        self.config = config
        self.engine = engine  # the process's engine of the quarantine's database, else one of its own
        self.node = node
        self.pid = os.getpid()
        self.queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self.dropped = 0
        self.outage = Outage("the quarantine database (history)", log, meanwhile="verdicts are not recorded in the history")
        self._store: History | None = None
        self._thread = threading.Thread(target=self._loop, name="history", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def record(self, r: dict) -> None:
        try:
            self.queue.put_nowait(r)
        except queue.Full:
            self.dropped += 1

    def _batch(self, timeout: float) -> list[dict]:
        """The rows queued within GATHER seconds of the first (at most BATCH_MAX): one transaction
        for many messages, not one each."""
        try:
            rows = [self.queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        until = time.monotonic() + GATHER
        while len(rows) < BATCH_MAX:
            left = until - time.monotonic()
            try:
                rows.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return rows

    def _write(self, rows: list[dict], status: bool) -> None:
        if not self.outage.usable():
            self.dropped += len(rows)
            return
        try:
            if self._store is None:
                self._store = History(self.engine()) if self.engine else History.open(self.config)
            self._store.add_many(rows)
            if status:
                self._store.report_status(self.node, self.pid, health(), self.dropped)
            self.outage.succeeded()
        except Exception as exc:  # noqa: BLE001 - whatever the database says, mail goes on
            self.dropped += len(rows)
            self.outage.failed(exc)

    def _loop(self) -> None:
        last_status = 0.0
        while True:
            rows = self._batch(1.0)
            now = time.monotonic()
            status = now - last_status >= STATUS_EVERY
            if rows or status:
                self._write(rows, status)
                if status:
                    last_status = now

    def flush(self) -> None:
        """Write what is queued (at exit), in the caller's thread."""
        if os.getpid() != self.pid:
            return
        rows = []
        while True:
            try:
                rows.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if rows:
            self._write(rows, False)

