"""The database-backed HashMemo: a file's content hash remembered against its stat key.

Reads the whole `file_hash` table once, on first use, into a dict; buffers puts and writes them in one
transaction at flush. Knows nothing of how files are hashed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import select
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from orchestrator.hashing import StatKey
from orchestrator.store.models import FileHashRow
from orchestrator.store.schema import signed64, unsigned64


class SqlHashMemo:
    """Implements orchestrator.hashing.HashMemo; safe to call from the threads that hash files in parallel."""

    def __init__(self, read: Callable[[], AbstractContextManager[Session]],
                 write: Callable[[], AbstractContextManager[Session]] | None) -> None:
        """`write` None: a read-only memo, whose flush() drops the puts (the history is not written)."""
        self._read, self._write = read, write
        self._lock = threading.Lock()
        self._known: dict[str, tuple[StatKey, str]] | None = None
        self._pending: dict[str, tuple[StatKey, str]] = {}

    def get(self, path: str, key: StatKey) -> str | None:
        with self._lock:
            known = self._load()
            entry = self._pending.get(path) or known.get(path)
        return entry[1] if entry is not None and entry[0] == key else None

    def put(self, path: str, key: StatKey, digest: str) -> None:
        with self._lock:
            self._pending[path] = (key, digest)

    def flush(self) -> None:
        """Write the buffered puts in one transaction (an upsert per path); a no-op when there are none, and on a
        read-only memo, which keeps them for this process only."""
        with self._lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return
            if self._write is None:  # read-only: remembered in this process only
                self._load().update(pending)
                return
            try:
                rows = [{"path": path, "dev": signed64(key[0]), "ino": signed64(key[1]), "size": key[2],
                         "mtime_ns": key[3], "digest": digest} for path, (key, digest) in pending.items()]
                with self._write() as session:
                    session.execute(_upsert(session), rows)  # one statement, executed for many rows
            except BaseException:
                self._pending = {**pending, **self._pending}
                raise
            if self._known is not None:
                self._known.update(pending)

    def _load(self) -> dict[str, tuple[StatKey, str]]:
        if self._known is None:
            with self._read() as session:
                rows = session.execute(select(FileHashRow.path, FileHashRow.dev, FileHashRow.ino,
                                              FileHashRow.size, FileHashRow.mtime_ns, FileHashRow.digest))
                self._known = {path: ((unsigned64(dev), unsigned64(ino), size, mtime_ns), digest)
                               for path, dev, ino, size, mtime_ns, digest in rows}
        return self._known


def _upsert(session: Session) -> Executable:
    """INSERT ... ON CONFLICT (path) DO UPDATE, which both SQLite and PostgreSQL (db.SUPPORTED) spell alike. Compiled
    once and executed with a list of rows: a multi-VALUES statement per chunk compiled anew each time (1 s for
    10,000 rows)."""
    columns = ("dev", "ino", "size", "mtime_ns", "digest")
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql  # ~0.1 s to import: only when the database is PostgreSQL

        pg = postgresql.insert(FileHashRow)
        return pg.on_conflict_do_update(index_elements=["path"], set_={c: pg.excluded[c] for c in columns})
    lite = sqlite.insert(FileHashRow)
    return lite.on_conflict_do_update(index_elements=["path"], set_={c: lite.excluded[c] for c in columns})
