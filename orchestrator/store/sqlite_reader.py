"""What `pipe status`, a dry run and the end of `pipe run` read of a SQLite history, answered with the standard
library's sqlite3: the latest run, every stage's last success and last record, the serving events and the
file-hash memo. The same values Store gives (a test compares the two on the same databases), without importing
SQLAlchemy, which took about half of a `pipe status` (issue 20). sqlite_writer.py adds what a run writes.

Read-only as `Store(url, read_only=True)` is: nothing is created, migrated or switched to WAL; an absent or empty
file is empty history; an older schema is one StoreError line (schema.py says it for both). A running run whose
owner is provably gone reads as interrupted (lease.gone), as Store answers it. Every other read, and every
PostgreSQL database, goes through Store.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from orchestrator.errors import StoreError
from orchestrator.hashing import StatKey
from orchestrator.results import Artifact, RunStatus, StageStatus
from orchestrator.store.lease import Owner, gone, this_host
from orchestrator.store.records import (
    INTERRUPTED,
    RunInfo,
    ServeEventInfo,
    StageHistory,
    StageRunInfo,
    Trigger,
    interrupted_view,
)
from orchestrator.store.schema import BUSY_TIMEOUT_MS, check_readable, unsigned64

_RUN = ("id, pipeline, pipeline_path, pipeline_hash, trigger, status, started_at, finished_at, git_commit, host, "
        "pid, exit_code, params_override, git_dirty, owner_process, heartbeat_at, lease_expires_at")
_STAGE = ("id, stage, status, reason, exit_code, attempts, infra_error, cache_key, cached_from, image_id, "
          "started_at, finished_at, duration_s, peak_memory_bytes, cpu_seconds, log_path, outputs_path, "
          "outputs_digest, user, hermetic, ingredients_json, gate_passed, warnings, executor, node, task_id")
# a stage record a cache miss is explained against: it succeeded, or was cached and kept its ingredients
_CANDIDATE = ("CASE WHEN s.status = 'succeeded' OR (s.status = 'cached' AND s.ingredients_json IS NOT NULL) "
              "THEN 1 ELSE 0 END")
_HISTORIES = f"""
WITH ranked AS (
  SELECT s.id AS id, {_CANDIDATE} AS candidate,
         ROW_NUMBER() OVER (PARTITION BY s.stage ORDER BY r.started_at DESC, r.id DESC) AS nth,
         ROW_NUMBER() OVER (PARTITION BY s.stage, {_CANDIDATE} ORDER BY r.started_at DESC, r.id DESC) AS nth_of_kind
  FROM stage_run s JOIN run r ON s.run_id = r.id
  WHERE r.pipeline = ? AND s.status IS NOT NULL AND r.id IS NOT ?
)
SELECT {', '.join(f's.{c.strip()}' for c in _STAGE.split(','))}, ranked.nth, ranked.candidate, ranked.nth_of_kind
FROM stage_run s JOIN ranked ON ranked.id = s.id
WHERE ranked.nth = 1 OR (ranked.candidate = 1 AND ranked.nth_of_kind = 1)
"""
T = TypeVar("T")


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///<path>` URL (the state dir's default, or --db); None for any other URL
    (PostgreSQL, in-memory, `file:` URIs, query options), which Store reads."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url.removeprefix("sqlite:///")
    return None if not path or path == ":memory:" or path.startswith("file:") else Path(path)


class SqliteHistory:
    """The reads of `pipe status` on one SQLite file (see the module's docstring); a context manager."""

    def __init__(self, path: Path) -> None:
        self._name = str(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        if not path.exists():  # a read never creates the file: absent history is empty history
            return
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            usable = self._usable(conn, _version(conn))
        except sqlite3.Error as e:
            raise StoreError(f"database {self._name} cannot be opened: {error_line(e)}") from e
        if usable:
            self._conn = conn
        else:
            conn.close()

    def _usable(self, conn: sqlite3.Connection, version: int | None) -> bool:
        """Whether this reads `conn` (False: empty history); StoreError for a database a read cannot use."""
        return check_readable(version, self._name) != 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def latest_run(self, pipeline: str) -> RunInfo | None:
        def read(conn: sqlite3.Connection) -> RunInfo | None:
            row = conn.execute(f"SELECT {_RUN} FROM run WHERE pipeline = ? ORDER BY started_at DESC, id DESC "
                               "LIMIT 1", (pipeline,)).fetchone()
            if row is None:
                return None
            stages = conn.execute(f"SELECT {_STAGE} FROM stage_run WHERE run_id = ? ORDER BY id",
                                  (row[0],)).fetchall()
            info = _run_info(row, _stage_infos(conn, stages))
            if info.status is RunStatus.RUNNING:
                now = parse_time(conn.execute("SELECT CURRENT_TIMESTAMP").fetchone()[0])
                assert now is not None
                why = owner_gone((row[9], row[10], row[14], row[16]), now, this_host())
                if why is not None:
                    info = interrupted_view(info, parse_time(row[15]) or now, f"{INTERRUPTED}: {why}")
            return info

        return self._read(read, None)

    def stage_histories(self, pipeline: str, exclude_run: str | None = None) -> dict[str, StageHistory]:
        """As Store.stage_histories: one window query over the pipeline's finished stage records."""
        def read(conn: sqlite3.Connection) -> dict[str, StageHistory]:
            rows = conn.execute(_HISTORIES, (pipeline, exclude_run)).fetchall()
            infos = dict(zip((r[0] for r in rows), _stage_infos(conn, [r[:-3] for r in rows]), strict=True))
            success: dict[str, StageRunInfo] = {}
            record: dict[str, StageRunInfo] = {}
            for row in rows:
                info, (nth, is_success, nth_of_kind) = infos[row[0]], row[-3:]
                if nth == 1:
                    record[info.stage] = info
                if is_success == 1 and nth_of_kind == 1:
                    success[info.stage] = info
            return {stage: StageHistory(success.get(stage), record.get(stage)) for stage in record}

        return self._read(read, {})

    def serve_events(self, pipeline: str, limit: int | None = 50) -> list[ServeEventInfo]:
        """As Store.serve_events: `pipeline`'s serving events, newest first."""
        def read(conn: sqlite3.Connection) -> list[ServeEventInfo]:
            rows = conn.execute("SELECT pipeline, at, event, run_id, digest, ok, detail FROM serve_event "
                                "WHERE pipeline = ? ORDER BY at DESC, id DESC LIMIT ?",
                                (pipeline, -1 if limit is None else limit)).fetchall()
            return [ServeEventInfo(pipeline=p, at=required_time(at), event=event, run_id=run_id, digest=digest,
                                   ok=bool(ok), detail=detail) for p, at, event, run_id, digest, ok, detail in rows]

        return self._read(read, [])

    def hash_memo(self) -> TableHashMemo:
        """A HashMemo over the `file_hash` table; its puts stay in this process (a read writes no history)."""
        return TableHashMemo(self._hashes())

    def _hashes(self) -> dict[str, tuple[StatKey, str]]:
        def read(conn: sqlite3.Connection) -> dict[str, tuple[StatKey, str]]:
            rows = conn.execute("SELECT path, dev, ino, size, mtime_ns, digest FROM file_hash")
            return {path: ((unsigned64(dev), unsigned64(ino), size, mtime_ns), digest)
                    for path, dev, ino, size, mtime_ns, digest in rows}

        return self._read(read, {})

    def _read(self, read: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """`read(conn)` in one read transaction (a consistent view across its queries); `empty` for no history."""
        if self._conn is None:
            return empty
        with self._lock:
            try:
                self._conn.execute("BEGIN")
                try:
                    return read(self._conn)
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"database {self._name} cannot be read: {error_line(e)}") from e


class TableHashMemo:
    """orchestrator.hashing.HashMemo over the file_hash rows read once. Puts wait for flush(), which hands them
    to `write` (one transaction; kept for the next flush if it fails); with no `write` (a read, which writes no
    history) they are remembered by this process only."""

    def __init__(self, known: dict[str, tuple[StatKey, str]],
                 write: Callable[[dict[str, tuple[StatKey, str]]], None] | None = None) -> None:
        self._known, self._write = known, write
        self._pending: dict[str, tuple[StatKey, str]] = {}
        self._lock = threading.Lock()

    def get(self, path: str, key: StatKey) -> str | None:
        with self._lock:
            entry = self._pending.get(path) or self._known.get(path)
        return entry[1] if entry is not None and entry[0] == key else None

    def put(self, path: str, key: StatKey, digest: str) -> None:
        with self._lock:
            self._pending[path] = (key, digest)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            if pending and self._write is not None:
                try:
                    self._write(pending)
                except BaseException:
                    self._pending = {**pending, **self._pending}
                    raise
            self._known.update(pending)


def _version(conn: sqlite3.Connection) -> int | None:
    """As migrations.current_version: 0 for an empty database, None for tables without schema_version."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
              if not name.startswith("sqlite_")}
    if "schema_version" not in tables:
        return 0 if not tables else None
    return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0)


def _stage_infos(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> list[StageRunInfo]:
    """The stage rows with their artifacts (by path) and metrics (by name), as Store's selectinload gives them."""
    ids = [row[0] for row in rows]
    artifacts: dict[int, list[Artifact]] = {i: [] for i in ids}
    metrics: dict[int, dict[str, float]] = {i: {} for i in ids}
    for chunk in _chunks(ids, 500):
        marks = ",".join("?" * len(chunk))
        for owner, path, size, digest in conn.execute(
                f"SELECT stage_run_id, path, size, digest FROM artifact WHERE stage_run_id IN ({marks}) "
                "ORDER BY stage_run_id, path", chunk):
            artifacts[owner].append(Artifact(path=path, size=size, digest=digest))
        for owner, name, value in conn.execute(
                f"SELECT stage_run_id, name, value FROM metric WHERE stage_run_id IN ({marks}) "
                "ORDER BY stage_run_id, name", chunk):
            metrics[owner][name] = value
    return [_stage_info(row, tuple(artifacts[row[0]]), metrics[row[0]]) for row in rows]


def _stage_info(row: Sequence[Any], artifacts: tuple[Artifact, ...], metrics: dict[str, float]) -> StageRunInfo:
    (_, stage, status, reason, exit_code, attempts, infra_error, cache_key, cached_from, image_id, started_at,
     finished_at, duration_s, peak_memory_bytes, cpu_seconds, log_path, outputs_path, outputs_digest, user,
     hermetic, ingredients_json, gate_passed, warnings, executor, node, task_id) = row
    return StageRunInfo(
        stage=stage, status=StageStatus(status) if status is not None else None, reason=reason,
        exit_code=exit_code, attempts=attempts, infra_error=bool(infra_error), cache_key=cache_key,
        cached_from=cached_from, image_id=image_id, started_at=parse_time(started_at), finished_at=parse_time(finished_at),
        duration_s=duration_s, peak_memory_bytes=peak_memory_bytes, cpu_seconds=cpu_seconds, log_path=log_path,
        outputs_path=outputs_path, outputs_digest=outputs_digest, user=user, hermetic=bool(hermetic),
        ingredients_json=ingredients_json, artifacts=artifacts, metrics=metrics,
        gate_passed=None if gate_passed is None else bool(gate_passed),
        warnings=tuple(json.loads(warnings) or ()) if warnings else (), executor=executor, node=node,
        task_id=task_id)


def _run_info(row: Sequence[Any], stages: Iterable[StageRunInfo]) -> RunInfo:
    (run_id, pipeline, pipeline_path, pipeline_hash, trigger, status, started_at, finished_at, git_commit, host,
     pid, exit_code, params_override, git_dirty) = row[:14]
    started = parse_time(started_at)
    assert started is not None  # NOT NULL
    trigger_value: Trigger = trigger
    return RunInfo(
        id=run_id, pipeline=pipeline, pipeline_path=pipeline_path, pipeline_hash=pipeline_hash,
        trigger=trigger_value, status=RunStatus(status), started_at=started, finished_at=parse_time(finished_at),
        git_commit=git_commit, host=host, pid=pid, exit_code=exit_code,
        params_override=json.loads(params_override) if params_override else {}, stages=tuple(stages),
        git_dirty=None if git_dirty is None else bool(git_dirty))


def error_line(error: sqlite3.Error) -> str:
    return " ".join(str(error).split())


def parse_time(value: str | None) -> datetime | None:
    """SQLAlchemy's SQLite text ("2026-12-02 10:19:14.123456", naive UTC) or CURRENT_TIMESTAMP's, made aware."""
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def owner_gone(owner: Sequence[Any], now: datetime, host: str) -> str | None:
    """lease.gone of a run row's (host, pid, owner_process, lease_expires_at)."""
    return gone(Owner(owner[0], owner[1], owner[2], parse_time(owner[3])), now, host)


def required_time(value: str) -> datetime:
    """parse_time of a NOT NULL column."""
    moment = parse_time(value)
    assert moment is not None
    return moment


def time_text(moment: datetime | None) -> str | None:
    """parse_time undone: an aware datetime as SQLAlchemy's SQLite DATETIME stores it (models.UTCDateTime), naive
    UTC text with microseconds, which sorts as time does."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment} given to the store; use an aware UTC datetime")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
