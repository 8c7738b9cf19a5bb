"""What `pipe run` writes of a SQLite history, with the standard library's sqlite3: the run, its lease, its stage
records with their artifacts and metrics, the file-hash memo, and the interrupted mark of a run whose owner is
gone. The same rows Store writes (a test writes one history with each and compares them row for row), without
importing SQLAlchemy, which took about a third of a no-op `pipe run` (issue 20).

Only for a file already at SCHEMA_VERSION and in WAL mode: creating, upgrading and switching a database stay
Store's (migrations.py), so api.open_run_history falls back to Store when `usable` is False. Each call is one
short transaction, a write holding SQLite's write lock from its start (BEGIN IMMEDIATE), as db.py makes Store's.
Every other write (serving, gates accepted, ticks, gc) and every PostgreSQL database go through Store.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.errors import NotFound, StoreError
from orchestrator.hashing import StatKey
from orchestrator.results import RunStatus, StageStatus
from orchestrator.store.lease import (
    HEARTBEAT_S,
    LEASE_S,
    Heartbeat,
    Leases,
    process_identity,
    this_host,
)
from orchestrator.store.records import (
    INTERRUPTED,
    TRIGGERS,
    StageRecord,
    Trigger,
    new_run_id,
    seconds_between,
)
from orchestrator.store.schema import SCHEMA_VERSION, signed64
from orchestrator.store.sqlite_reader import (
    SqliteHistory,
    TableHashMemo,
    error_line,
    owner_gone,
    parse_time,
    required_time,
    time_text,
)

T = TypeVar("T")
_RUNNING = RunStatus.RUNNING.value
_OWNER = "host, pid, owner_process, lease_expires_at"
_FILL = ", ".join(f"{column} = ?" for column in (
    "status", "reason", "exit_code", "attempts", "infra_error", "cache_key", "cached_from", "image_id", "started_at",
    "finished_at", "duration_s", "peak_memory_bytes", "cpu_seconds", "log_path", "outputs_path", "outputs_digest",
    "user", "hermetic", "ingredients_json", "gate_passed", "warnings", "executor", "node", "task_id"))
_HASH_UPSERT = ("INSERT INTO file_hash (path, dev, ino, size, mtime_ns, digest) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET dev = excluded.dev, ino = excluded.ino, size = excluded.size, "
                "mtime_ns = excluded.mtime_ns, digest = excluded.digest")
_GATE_PASSED = ("SELECT r.started_at, r.id, m.value FROM run r JOIN stage_run s ON s.run_id = r.id "
                "JOIN metric m ON m.stage_run_id = s.id WHERE r.pipeline = ? AND s.stage = ? AND s.gate_passed = 1 "
                "AND m.name = ? ORDER BY r.started_at DESC LIMIT 1")
_GATE_ACCEPTED = ("SELECT accepted_at, run_id, value FROM gate_baseline WHERE pipeline = ? AND stage = ? "
                  "AND metric = ? ORDER BY accepted_at DESC, id DESC LIMIT 1")


class SqliteRunStore(SqliteHistory):
    """The history a run reads and writes (records.RunHistory) on one SQLite file; see the module's docstring.
    `lease_s`: how long a lease it writes holds. Thread-safe: the heartbeat and parallel stages share it."""

    def __init__(self, path: Path, *, lease_s: float = LEASE_S) -> None:
        self._lease = timedelta(seconds=lease_s)
        self._leases = Leases(self.renew_lease)
        super().__init__(path)

    def _usable(self, conn: sqlite3.Connection, version: int | None) -> bool:
        """A file at SCHEMA_VERSION already in WAL mode; anything else is Store's to create, upgrade or refuse."""
        if version != SCHEMA_VERSION or conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            return False
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        return True

    @property
    def usable(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        """Stops the heartbeats of the runs this store leased, then closes the file."""
        self._leases.stop_all()
        super().close()

    # --- a run and its lease (Store's methods of the same names) ------------------------------------------

    def begin_run(self, pipeline: str, pipeline_path: str, pipeline_hash: str, trigger: Trigger,
                  git_commit: str | None, host: str, pid: int, params_override: dict[str, Any],
                  git_dirty: bool | None = None) -> str:
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, not {trigger!r}")
        started_at = datetime.now(UTC)
        owner = process_identity(pid) if host == this_host() else None

        def write(conn: sqlite3.Connection) -> str:
            run_id = new_run_id(started_at)
            while conn.execute("SELECT 1 FROM run WHERE id = ?", (run_id,)).fetchone():  # the same suffix drawn
                run_id = new_run_id(started_at)
            now = _db_now(conn)
            conn.execute(
                "INSERT INTO run (id, pipeline, pipeline_path, pipeline_hash, trigger, status, started_at, "
                "finished_at, git_commit, host, pid, exit_code, params_override, git_dirty, owner_process, "
                "heartbeat_at, lease_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                (run_id, pipeline, pipeline_path, pipeline_hash, trigger, _RUNNING, time_text(started_at), git_commit,
                 host, pid, json.dumps(params_override), _flag(git_dirty), owner, time_text(now),
                 time_text(now + self._lease)))
            return run_id

        return self._write(write)

    def lease(self, run_id: str, interval_s: float = HEARTBEAT_S) -> Heartbeat:
        return self._leases.lease(run_id, interval_s)

    def renew_lease(self, run_id: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            now = _db_now(conn)
            renewed = conn.execute("UPDATE run SET heartbeat_at = ?, lease_expires_at = ? WHERE id = ? AND status = ?",
                                   (time_text(now), time_text(now + self._lease), run_id, _RUNNING))
            return renewed.rowcount > 0

        return self._write(write)

    def mark_stage_running(self, run_id: str, stage: str, attempt: int, started_at: datetime,
                           log_path: str | None = None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            row_id, _, old_log = self._stage_row(conn, run_id, stage)
            conn.execute("UPDATE stage_run SET status = NULL, reason = '', exit_code = NULL, attempts = ?, "
                         "started_at = ?, finished_at = NULL, duration_s = NULL, log_path = ? WHERE id = ?",
                         (attempt, time_text(started_at), log_path or old_log, row_id))
            _details(conn, row_id, (), {})  # a retry starts clean

        self._write(write)

    def record_stages(self, run_id: str, records: Sequence[StageRecord]) -> None:
        if not records:
            return

        def write(conn: sqlite3.Connection) -> None:
            for record in records:
                result = record.result
                row_id, old_start, old_log = self._stage_row(conn, run_id, result.stage)
                started = result.started_at or old_start
                where = result.ran_on
                conn.execute(f"UPDATE stage_run SET {_FILL} WHERE id = ?", (
                    result.status.value, result.reason, result.exit_code, result.attempts,
                    _flag(result.infra_error), result.cache_key, result.cached_from, result.image_id,
                    time_text(started), time_text(result.finished_at),
                    seconds_between(started, result.finished_at) if result.finished_at else None,
                    result.peak_memory_bytes, result.cpu_seconds, result.log_path or old_log, result.outputs_path,
                    result.outputs_digest, record.user, _flag(record.hermetic), record.ingredients_json,
                    _flag(record.gate_passed), json.dumps(list(result.warnings) or None),
                    *((where.executor, where.node, where.task_id) if where else (None, None, None)), row_id))
                _details(conn, row_id, [(a.path, a.size, a.digest) for a in result.artifacts], result.metrics)

        self._write(write)

    def finish_run(self, run_id: str, status: RunStatus, exit_code: int) -> None:
        self._leases.stop(run_id)

        def write(conn: sqlite3.Connection) -> None:
            if not conn.execute("UPDATE run SET status = ?, exit_code = ?, finished_at = ? WHERE id = ?",
                                (status.value, exit_code, time_text(datetime.now(UTC)), run_id)).rowcount:
                raise self._no_run(run_id)

        self._write(write)

    def mark_interrupted(self, run_id: str, reason: str = INTERRUPTED) -> bool:
        self._leases.stop(run_id)

        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT status, heartbeat_at FROM run WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise self._no_run(run_id)
            if row[0] != _RUNNING:
                return False
            now = parse_time(row[1]) or datetime.now(UTC)
            conn.execute("UPDATE run SET status = ?, finished_at = ? WHERE id = ?",
                         (RunStatus.INTERRUPTED.value, time_text(now), run_id))
            for stage_id, started_text in conn.execute(
                    "SELECT id, started_at FROM stage_run WHERE run_id = ? AND status IS NULL", (run_id,)).fetchall():
                started = parse_time(started_text)
                end = max(now, started) if started else now
                conn.execute("UPDATE stage_run SET status = ?, reason = ?, finished_at = ?, duration_s = ? "
                             "WHERE id = ?", (StageStatus.FAILED.value, reason, time_text(end),
                                              seconds_between(started, end), stage_id))
            return True

        return self._write(write)

    def mark_dead_runs(self, pipeline: str) -> list[str]:
        def read(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(f"SELECT id, {_OWNER} FROM run WHERE pipeline = ? AND status = ?",
                                (pipeline, _RUNNING)).fetchall()
            now, host = _db_now(conn), this_host()
            verdicts = {row[0]: owner_gone(row[1:], now, host) for row in rows}
            return {run_id: why for run_id, why in verdicts.items() if why is not None}

        dead: dict[str, str] = self._read(read, {})
        return [run_id for run_id, why in dead.items() if self.mark_interrupted(run_id, f"{INTERRUPTED}: {why}")]

    def run_alive(self, run_id: str) -> bool | None:
        def read(conn: sqlite3.Connection) -> bool | None:
            row = conn.execute(f"SELECT status, {_OWNER} FROM run WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            return row[0] == _RUNNING and owner_gone(row[1:], _db_now(conn), this_host()) is None

        return self._read(read, None)

    def gate_baseline(self, pipeline: str, stage: str, metric: str) -> tuple[str, float] | None:
        def read(conn: sqlite3.Connection) -> list[tuple[datetime, str, float]]:
            passed = conn.execute(_GATE_PASSED, (pipeline, stage, metric)).fetchone()
            accepted = conn.execute(_GATE_ACCEPTED, (pipeline, stage, metric)).fetchone()
            return [(required_time(row[0]), row[1], row[2]) for row in (passed, accepted) if row]

        found: list[tuple[datetime, str, float]] = self._read(read, [])
        if not found:
            return None
        _, run_id, value = max(found, key=lambda row: row[0])
        return run_id, value

    def hash_memo(self) -> TableHashMemo:
        """A HashMemo whose flush() upserts the hashes put, in one transaction."""
        def write(pending: dict[str, tuple[StatKey, str]]) -> None:
            rows = [(path, signed64(key[0]), signed64(key[1]), key[2], key[3], digest)
                    for path, (key, digest) in pending.items()]
            self._write(lambda conn: conn.executemany(_HASH_UPSERT, rows))

        return TableHashMemo(self._hashes(), write)

    # --- transactions and rows ---------------------------------------------------------------------------------

    def _write(self, write: Callable[[sqlite3.Connection], T]) -> T:
        """`write(conn)` in one transaction that holds the write lock from its start, committed on return."""
        if self._conn is None:
            raise StoreError(f"database {self._name} is not open for writing")
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    result = write(self._conn)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                return result
            except sqlite3.Error as e:
                raise StoreError(f"database {self._name} cannot be written: {error_line(e)}") from e

    def _stage_row(self, conn: sqlite3.Connection, run_id: str, stage: str) -> tuple[int, datetime | None, str | None]:
        """(id, started_at, log_path) of the stage's row in this run; a new row, as Store makes it, if none."""
        row = conn.execute("SELECT id, started_at, log_path FROM stage_run WHERE run_id = ? AND stage = ?",
                           (run_id, stage)).fetchone()
        if row is not None:
            return row[0], parse_time(row[1]), row[2]
        if conn.execute("SELECT 1 FROM run WHERE id = ?", (run_id,)).fetchone() is None:
            raise self._no_run(run_id)
        made = conn.execute("INSERT INTO stage_run (run_id, stage, status, reason, attempts, infra_error, hermetic) "
                            "VALUES (?, ?, NULL, '', 0, 0, 1)", (run_id, stage))
        assert made.lastrowid is not None
        return made.lastrowid, None, None

    def _no_run(self, run_id: str) -> NotFound:
        return NotFound(f"run {run_id} is not in the history database {self._name}")


def _details(conn: sqlite3.Connection, stage_id: int, artifacts: Sequence[tuple[str, int, str]],
             metrics: dict[str, float]) -> None:
    """Replace the stage row's artifacts (in the result's order) and metrics (by name), as Store's
    delete-orphan collections do."""
    conn.execute("DELETE FROM artifact WHERE stage_run_id = ?", (stage_id,))
    conn.execute("DELETE FROM metric WHERE stage_run_id = ?", (stage_id,))
    conn.executemany("INSERT INTO artifact (stage_run_id, path, size, digest) VALUES (?, ?, ?, ?)",
                     [(stage_id, *artifact) for artifact in artifacts])
    conn.executemany("INSERT INTO metric (stage_run_id, name, value) VALUES (?, ?, ?)",
                     [(stage_id, name, value) for name, value in sorted(metrics.items())])


def _db_now(conn: sqlite3.Connection) -> datetime:
    """The database's clock, which leases are written and judged by (store._db_now; SQLite: to the second)."""
    return required_time(conn.execute("SELECT CURRENT_TIMESTAMP").fetchone()[0])


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)
