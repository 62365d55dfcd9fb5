"""What the stores kept in the quarantine's database share: running work in one
transaction, and a schema versioned in a table of its own.

The quarantine (`quarantine.py`), the history of verdicts (`history.py`) and the
console's users (`users.py`) live in one database, named by `quarantine.url`,
each with its own version table, so that each upgrades on its own.
"""

from __future__ import annotations

import logging
from typing import Callable

from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("milterguard.stores")


def why(exc: BaseException) -> str:
    """One line for the log: the driver's own message, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return f"{type(orig if orig is not None else exc).__name__}: {text[0] if text else ''}"


def run(engine: Engine, work: Callable, error: type[Exception]):
    """WORK(connection) in one transaction; database and disk failures are raised as ERROR."""
    try:
        with engine.begin() as conn:
            return work(conn)
    except (SQLAlchemyError, OSError) as exc:
        raise error(why(exc)) from exc


def version_table(metadata: MetaData, name: str) -> Table:
    return Table(name, metadata, Column("version", Integer, nullable=False))


def upgrade(engine: Engine, table: Table, upgrades: dict[int, Callable], target: int, lock_key: int,
            what: str, error: type[Exception]) -> None:
    """Bring the schema of TABLE's store to TARGET, one step of UPGRADES at a time.

    PostgreSQL nodes that start together upgrade one after the other (an advisory lock)."""

    def work(conn) -> None:
        if engine.url.drivername != "sqlite" and not engine.url.drivername.startswith("sqlite"):
            conn.execute(select(func.pg_advisory_xact_lock(lock_key)))
        table.create(conn, checkfirst=True)
        current = conn.execute(select(table.c.version)).scalar()
        if current is None:
            conn.execute(insert(table).values(version=0))
            current = 0
        if current > target:
            raise error(f"the {what} schema is version {current}, newer than this milterguard's ({target}): "
                        "upgrade milterguard")
        for version in range(current + 1, target + 1):
            upgrades[version](conn)
            conn.execute(update(table).values(version=version))
            log.info("%s schema upgraded to version %d", what, version)

    run(engine, work, error)


def open_engine(config, error: type[Exception]) -> Engine:
    """The SQLAlchemy engine of `quarantine.url`, made as the quarantine makes it (SQLite 0600, WAL,
    PostgreSQL through psycopg), with the quarantine's own schema brought up to date; its failure
    is raised as ERROR, the calling store's own error."""
    from milterguard.stores.quarantine import Quarantine, QuarantineError
    from milterguard.settings import node_name

    try:
        return Quarantine(config["quarantine.url"], node=node_name(config)).engine
    except QuarantineError as exc:
        raise error(str(exc)) from None
