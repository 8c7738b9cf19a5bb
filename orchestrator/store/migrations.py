"""Schema migrations of the history database, one function per version, without Alembic.

The table `schema_version` holds one row: the version the database is at. Version 1 is the schema of the first
release; each later step upgrades from the one before, inside the caller's transaction. The tables below are a
frozen copy of what each version created: never edit a released step, add a new one and bump SCHEMA_VERSION
(`models.py` mirrors the latest; tests/unit/test_store.py checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)

from orchestrator.store.schema import SCHEMA_VERSION

_frozen = MetaData()

_schema_version = Table("schema_version", _frozen, Column("version", Integer, nullable=False))

# --- v1: the first release --------------------------------------------------------------------------------
_run = Table(
    "run", _frozen,
    Column("id", String(32), primary_key=True),
    Column("pipeline", String(128), nullable=False),
    Column("pipeline_path", Text, nullable=False),
    Column("pipeline_hash", String(128), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("git_commit", String(64)),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("exit_code", Integer),
    Column("params_override", JSON, nullable=False),
    Index("ix_run_pipeline_started", "pipeline", "started_at", "id"),
    Index("ix_run_status", "status"),
)
_stage_run = Table(
    "stage_run", _frozen,
    Column("id", Integer, primary_key=True),
    Column("run_id", String(32), ForeignKey("run.id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(128), nullable=False),
    Column("status", String(16)),
    Column("reason", Text, nullable=False),
    Column("exit_code", Integer),
    Column("attempts", Integer, nullable=False),
    Column("infra_error", Boolean, nullable=False),
    Column("cache_key", String(128)),
    Column("cached_from", String(32)),
    Column("image_id", String(128)),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("duration_s", Float),
    Column("peak_memory_bytes", BigInteger),
    Column("cpu_seconds", Float),
    Column("log_path", Text),
    Column("outputs_path", Text),
    Column("outputs_digest", String(128)),
    Column("user", String(64)),
    Column("hermetic", Boolean, nullable=False),
    Column("ingredients_json", Text),
    UniqueConstraint("run_id", "stage", name="uq_stage_run_run_stage"),
    Index("ix_stage_run_stage_status", "stage", "status"),
    Index("ix_stage_run_cache_key", "cache_key"),
)
_artifact = Table(
    "artifact", _frozen,
    Column("id", Integer, primary_key=True),
    Column("stage_run_id", Integer, ForeignKey("stage_run.id", ondelete="CASCADE"), nullable=False),
    Column("path", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("digest", String(128), nullable=False),
    Index("ix_artifact_stage_run_id", "stage_run_id"),
)
_metric = Table(
    "metric", _frozen,
    Column("id", Integer, primary_key=True),
    Column("stage_run_id", Integer, ForeignKey("stage_run.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("value", Float, nullable=False),
    Index("ix_metric_stage_run_id", "stage_run_id"),
)
_file_hash = Table(
    "file_hash", _frozen,
    Column("path", Text, primary_key=True),
    Column("dev", BigInteger, nullable=False),
    Column("ino", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("digest", String(128), nullable=False),
)

# --- v2: scheduler ticks (issue 8) and quality gates (issue 7) -----------------------------------------------
_tick = Table(
    "tick", _frozen,
    Column("id", Integer, primary_key=True),
    Column("pipeline", String(128), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("action", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("run_id", String(32), ForeignKey("run.id", ondelete="SET NULL")),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Index("ix_tick_pipeline_due", "pipeline", "due_at"),
)

# --- v3: the lease of a running run (issue 14): who owns it and until when it is known alive ------------------
_lease_columns = (
    Column("owner_process", String(128)),
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("lease_expires_at", DateTime(timezone=True)),
)
_V3_LEASE_S = 60  # what a run that was running at the upgrade gets: a lease from the upgrade, this long


# --- v4: accepted gate baselines, stage warnings, a dirty git tree (issue 14) --------------------------------
_gate_baseline = Table(
    "gate_baseline", _frozen,
    Column("id", Integer, primary_key=True),
    Column("pipeline", String(128), nullable=False),
    Column("stage", String(64), nullable=False),
    Column("metric", String(128), nullable=False),
    Column("run_id", String(32), ForeignKey("run.id", ondelete="CASCADE"), nullable=False),
    Column("value", Float, nullable=False),
    Column("accepted_at", DateTime(timezone=True), nullable=False),
    Index("ix_gate_baseline_lookup", "pipeline", "stage", "metric", "accepted_at"),
)

# --- v5: serving (issue 18): promotions, rollbacks, start, stop and health changes of the served model -------
_serve_event = Table(
    "serve_event", _frozen,
    Column("id", Integer, primary_key=True),
    Column("pipeline", String(128), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("event", String(32), nullable=False),
    Column("run_id", String(32), ForeignKey("run.id", ondelete="SET NULL")),
    Column("digest", String(128)),
    Column("ok", Boolean, nullable=False),
    Column("detail", Text, nullable=False),
    Index("ix_serve_event_pipeline_at", "pipeline", "at", "id"),
)


# --- v6: where each stage ran (issue 16): the executor kind, the node, and the engine's id of the attempt ------
_placement_columns = (
    Column("executor", String(16)),
    Column("node", String(255)),
    Column("task_id", String(128)),
)


def _to_v1(conn: Connection) -> None:
    _frozen.create_all(conn, tables=[_schema_version, _run, _stage_run, _artifact, _metric, _file_hash])


def _to_v2(conn: Connection) -> None:
    _tick.create(conn)
    conn.execute(text("ALTER TABLE stage_run ADD COLUMN gate_passed BOOLEAN"))


def _to_v3(conn: Connection) -> None:
    for column in _lease_columns:
        conn.execute(text(f"ALTER TABLE run ADD COLUMN {column.name} {column.type.compile(dialect=conn.dialect)}"))
    # A run recorded as running has no lease yet: it gets one from the upgrade, on the database's clock, so it
    # is not taken for dead at once (its pipe may still run) nor kept running forever (it may have died).
    if conn.dialect.name == "postgresql":
        now, expires = "now()", f"now() + interval '{_V3_LEASE_S} seconds'"
    else:
        now, expires = "datetime('now')", f"datetime('now', '+{_V3_LEASE_S} seconds')"
    conn.execute(text(f"UPDATE run SET heartbeat_at = {now}, lease_expires_at = {expires} WHERE status = 'running'"))


def _to_v4(conn: Connection) -> None:
    _gate_baseline.create(conn)
    conn.execute(text("ALTER TABLE stage_run ADD COLUMN warnings JSON"))
    conn.execute(text("ALTER TABLE run ADD COLUMN git_dirty BOOLEAN"))


def _to_v5(conn: Connection) -> None:
    _serve_event.create(conn)


def _to_v6(conn: Connection) -> None:
    for column in _placement_columns:
        conn.execute(text(f"ALTER TABLE stage_run ADD COLUMN {column.name} "
                          f"{column.type.compile(dialect=conn.dialect)}"))


STEPS: dict[int, Callable[[Connection], None]] = {1: _to_v1, 2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5, 6: _to_v6}
assert sorted(STEPS) == list(range(1, SCHEMA_VERSION + 1)), "one migration step per schema version"


def current_version(conn: Connection) -> int | None:
    """The database's schema version: 0 when it is empty, None when it holds tables but is not pipe's."""
    if not inspect(conn).has_table("schema_version"):
        return 0 if not inspect(conn).get_table_names() else None
    return int(conn.execute(text("SELECT max(version) FROM schema_version")).scalar_one() or 0)


def upgrade(conn: Connection, from_version: int, to_version: int = SCHEMA_VERSION) -> None:
    """Run the steps after `from_version` up to `to_version` and stamp it; the caller owns the transaction."""
    for version in range(from_version + 1, to_version + 1):
        STEPS[version](conn)
    conn.execute(_schema_version.delete())
    conn.execute(_schema_version.insert().values(version=to_version))
