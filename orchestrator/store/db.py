"""Opens the history database: SQLite (a private file in WAL mode) or PostgreSQL, migrated to SCHEMA_VERSION;
or, for the commands that only read, as it is: never created nor migrated.

Every SQLAlchemy or OS error met while opening becomes a StoreError naming the database. Knows no tables.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from orchestrator.errors import StoreError
from orchestrator.store import migrations
from orchestrator.store.schema import BUSY_TIMEOUT_MS, SCHEMA_VERSION, check_readable, check_version

WRITE = "pipe_write"  # execution option: this engine's transactions will write (SQLite: BEGIN IMMEDIATE)
SUPPORTED = ("sqlite", "postgresql")
_MIGRATION_LOCK = 0x70697065  # "pipe": a PostgreSQL advisory lock so two first opens do not both migrate


def describe(url: str | URL) -> str:
    """How messages name the database: the file for SQLite, the URL without its password otherwise."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def open_engine(url: str, read_only: bool = False) -> Engine:
    """An engine on `url` whose schema is at SCHEMA_VERSION; creates or upgrades the database as needed.

    Raises StoreError when the URL is unusable, the database cannot be opened, is not pipe's, or comes from a
    newer pipe. The engine's transactions only read; use `engine.execution_options(pipe_write=True)` to write.

    `read_only`: nothing is created, migrated or switched (not even SQLite's WAL mode). An absent or empty
    database is empty history (an engine on an empty in-memory database); one of an older schema is a
    StoreError asking for one `pipe run`, which upgrades it.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StoreError(f"database URL {url!r} is not a valid SQLAlchemy URL: {e}") from e
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED:
        raise StoreError(f"database {describe(parsed)} uses {backend}; pipe supports sqlite and postgresql")
    name = describe(parsed)
    if read_only and backend == "sqlite" and not _sqlite_exists(parsed):
        return empty_engine()
    try:
        if backend == "sqlite":
            engine = _sqlite_engine(parsed, read_only)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
    except OSError as e:
        raise StoreError(f"database {name} cannot be created: {e.strerror}: {e.filename}") from e
    except ImportError as e:
        raise StoreError(f"database {name} needs a driver that is not installed: {e}; pip install it") from e
    except SQLAlchemyError as e:
        raise StoreError(f"database {name} cannot be opened: {one_line(e)}") from e
    try:
        if read_only:
            if _read_only_version(engine, name) == 0:
                engine.dispose()
                return empty_engine()
        else:
            _ensure_schema(engine, name)
    except SQLAlchemyError as e:
        engine.dispose()
        raise StoreError(f"database {name} cannot be opened: {one_line(e)}") from e
    except StoreError:
        engine.dispose()
        raise
    return engine


def one_line(error: SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's multi-line SQL and background link."""
    orig = getattr(error, "orig", None)
    return " ".join(str(orig if orig is not None else error).split())


def empty_engine() -> Engine:
    """An in-memory SQLite database at SCHEMA_VERSION with no rows: what a read of absent history sees."""
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", partial(_sqlite_connect, wal=False))
    event.listen(engine, "begin", _sqlite_begin)
    with engine.begin() as conn:
        migrations.upgrade(conn, 0)
    return engine


def _sqlite_exists(url: URL) -> bool:
    """False when the URL names a database file that does not exist (a read must not create it)."""
    if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
        return True
    return Path(url.database).exists()


def _sqlite_engine(url: URL, read_only: bool = False) -> Engine:
    if not read_only and url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        _create_private_file(Path(url.database))
    engine = create_engine(url)
    event.listen(engine, "connect", partial(_sqlite_connect, wal=not read_only))
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _create_private_file(path: Path) -> None:
    """Create the database file 0600 (and its folder 0700) if missing; SQLite gives -wal/-shm the same mode."""
    if path.exists():
        return
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass  # another process created it first


def _sqlite_connect(dbapi_connection: Any, _record: Any, wal: bool = True) -> None:
    # Take transactions out of pysqlite's hands (it would BEGIN lazily, and never IMMEDIATE): _sqlite_begin
    # emits them. See the SQLAlchemy docs, "Serializable isolation / Savepoints / Transactional DDL".
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    if wal:
        _use_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL, which it keeps: done once, by whichever process comes first.

    Processes that open a new file at the same moment all try the switch, and SQLite answers some of them
    "database is locked" at once, without the busy timeout (it refuses a lock upgrade that could deadlock), so
    the switch is retried with a short random pause until the busy timeout has passed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the write lock up front: a deferred transaction that reads and then writes fails at once
    # with SQLITE_BUSY (no busy wait) when another process committed in between. Readers never block in WAL.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


def _ensure_schema(engine: Engine, name: str) -> None:
    with engine.connect() as conn:
        version = migrations.current_version(conn)
    check_version(version, name)
    if version == SCHEMA_VERSION:
        return
    with engine.execution_options(**{WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        version = migrations.current_version(conn)  # again, under the lock: another process may have won
        check_version(version, name)
        if version is not None and version < SCHEMA_VERSION:
            migrations.upgrade(conn, version)


def _read_only_version(engine: Engine, name: str) -> int:
    """The schema version of a database opened read-only: SCHEMA_VERSION, or 0 when it is empty."""
    with engine.connect() as conn:
        return check_readable(migrations.current_version(conn), name)
