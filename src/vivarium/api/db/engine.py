"""Opening the database: URL normalisation, the async engine, migrations on start."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from vivarium.errors import CatalogUnavailable, ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"
DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg",
           "postgres": "postgresql+asyncpg"}  # fmt: skip


def async_url(url: str) -> str:
    """`sqlite:///path` or `postgresql://user:pw@host/db` (the usual forms) -> async drivers."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"VIVARIUM_DATABASE_URL is not a database URL: {exc}") from None
    backend = parsed.drivername.split("+", 1)[0]
    if backend not in DRIVERS:
        raise ConfigError(f"unsupported database {backend!r}", "use sqlite:/// or postgresql://")
    return parsed.set(drivername=DRIVERS[backend]).render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # We issue BEGIN ourselves (below) instead of the driver's deferred one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers never wait for the writer; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _begin_immediate(conn: Connection) -> None:
    # A deferred transaction that reads and then writes fails with SQLITE_BUSY when another
    # writer got in between (WAL snapshots cannot be upgraded); taking the write lock up front
    # makes such transactions (count, then insert) wait their turn instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


UNREACHABLE_HINT = "the database is down or unreachable; retry once it is back"


def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    # The driver's connect errors (refused, no socket, shutting down) are not the DBAPI's
    # errors: SQLAlchemy passes them through raw, and the API would answer 500.
    try:
        return dialect.connect(*cargs, **cparams)
    except (OSError, dialect.loaded_dbapi.Error) as exc:
        raise CatalogUnavailable(
            f"the catalog cannot be reached ({exc})", UNREACHABLE_HINT
        ) from exc


def _disconnected(context: ExceptionContext) -> None:
    # A pooled connection the server dropped (it stopped, or restarted): the request fails
    # as unavailable, and the pool connects anew for the next one.
    if context.is_disconnect:
        raise CatalogUnavailable("the catalog connection was lost", UNREACHABLE_HINT)


def open_engine(url: str) -> AsyncEngine:
    full = async_url(url)
    if full.startswith("sqlite"):
        path = make_url(full).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # The catalog is root's alone; SQLite gives its -wal and -shm files this mode too.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        engine = create_async_engine(full)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _begin_immediate)
        return engine
    engine = create_async_engine(full, pool_pre_ping=True, pool_size=10, max_overflow=20)
    event.listen(engine.sync_engine, "do_connect", _connect)
    event.listen(engine.sync_engine, "handle_error", _disconnected)
    return engine


def _upgrade(connection: Connection) -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration otherwise
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration (idempotent; run at every start)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


STARTUP_LOCK = 0x766976617269  # "vivari": PostgreSQL advisory lock key of the catalog's start


@asynccontextmanager
async def startup_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """Held while one process migrates the catalog and makes its first team: parts of a
    cluster that start together do it one after another (SQLite has one process anyway)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": STARTUP_LOCK})
        await conn.commit()
        try:
            yield
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": STARTUP_LOCK})
            await conn.commit()
