"""The history schema as typed SQLAlchemy 2.0 mapped classes (schema v5); they never leave `store/`.

The tables are created and upgraded by `migrations.py`, not by `create_all`; a test keeps the two in step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from orchestrator.results import RunStatus, StageStatus

ID_LEN = 32  # run ids: "20261121-235959-ab12"
NAME_LEN = 128  # pipeline, stage and metric names
DIGEST_LEN = 128  # hex digests and cache keys, with room for an algorithm prefix
STATUS_LEN = 16


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend.

    SQLite has no time zone type: the value is stored as naive UTC text (which sorts correctly) and comes back
    aware; PostgreSQL stores `timestamptz` and gets an aware value converted to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value} given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


def status_type(enum: type[StrEnum]) -> Enum:
    """VARCHAR, not a database enum: a new status needs no migration."""
    return Enum(enum, native_enum=False, create_constraint=False, length=STATUS_LEN, values_callable=_values)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class RunRow(Base):
    __tablename__ = "run"
    __table_args__ = (
        Index("ix_run_pipeline_started", "pipeline", "started_at", "id"),  # pipe status, pipe runs (newest first)
        Index("ix_run_status", "status"),  # running runs, to find interrupted ones
    )

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(NAME_LEN))
    pipeline_path: Mapped[str] = mapped_column(Text)
    pipeline_hash: Mapped[str] = mapped_column(String(DIGEST_LEN))
    trigger: Mapped[str] = mapped_column(String(STATUS_LEN))  # "manual" | "schedule"
    status: Mapped[RunStatus] = mapped_column(status_type(RunStatus))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    git_commit: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    exit_code: Mapped[int | None]
    params_override: Mapped[dict[str, Any]]
    git_dirty: Mapped[bool | None]  # added in schema v4: uncommitted changes in the pipeline's git tree
    # the lease (schema v3): `host` and `pid` own the run; `owner_process` tells that pid from a later process
    # given the same number (lease.process_identity); the owner renews the lease while it lives (lease.py)
    owner_process: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None]  # the database's clock
    lease_expires_at: Mapped[datetime | None]

    # lazy="raise": listing runs must never load stages by accident; callers ask with selectinload
    stages: Mapped[list[StageRunRow]] = relationship(
        back_populates="run", cascade="all, delete-orphan", lazy="raise", order_by="StageRunRow.id")


class StageRunRow(Base):
    __tablename__ = "stage_run"
    __table_args__ = (
        UniqueConstraint("run_id", "stage", name="uq_stage_run_run_stage"),  # also the index by run_id
        Index("ix_stage_run_stage_status", "stage", "status"),  # last success of a stage
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(NAME_LEN))
    status: Mapped[StageStatus | None] = mapped_column(status_type(StageStatus))  # NULL while running
    reason: Mapped[str] = mapped_column(Text)
    exit_code: Mapped[int | None]
    attempts: Mapped[int]
    infra_error: Mapped[bool]
    cache_key: Mapped[str | None] = mapped_column(String(DIGEST_LEN), index=True)
    cached_from: Mapped[str | None] = mapped_column(String(ID_LEN))
    image_id: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cpu_seconds: Mapped[float | None] = mapped_column(Float)
    log_path: Mapped[str | None] = mapped_column(Text)
    outputs_path: Mapped[str | None] = mapped_column(Text)
    outputs_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    user: Mapped[str | None] = mapped_column(String(64))
    hermetic: Mapped[bool]
    ingredients_json: Mapped[str | None] = mapped_column(Text)
    gate_passed: Mapped[bool | None]  # added in schema v2
    warnings: Mapped[list[str] | None] = mapped_column(JSON)  # added in schema v4
    executor: Mapped[str | None] = mapped_column(String(16))  # added in schema v6: local | swarm | kubernetes
    node: Mapped[str | None] = mapped_column(String(255))  # v6: the node's name as its engine gives it
    task_id: Mapped[str | None] = mapped_column(String(128))  # v6: container, swarm task or Job of the attempt

    run: Mapped[RunRow] = relationship(back_populates="stages")
    artifacts: Mapped[list[ArtifactRow]] = relationship(
        cascade="all, delete-orphan", lazy="raise", order_by="ArtifactRow.path")
    metrics: Mapped[list[MetricRow]] = relationship(
        cascade="all, delete-orphan", lazy="raise", order_by="MetricRow.name")


class ArtifactRow(Base):
    __tablename__ = "artifact"

    id: Mapped[int] = mapped_column(primary_key=True)
    stage_run_id: Mapped[int] = mapped_column(ForeignKey("stage_run.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the stage's output folder
    size: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(DIGEST_LEN))


class MetricRow(Base):
    __tablename__ = "metric"

    id: Mapped[int] = mapped_column(primary_key=True)
    stage_run_id: Mapped[int] = mapped_column(ForeignKey("stage_run.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    value: Mapped[float] = mapped_column(Float)


class FileHashRow(Base):
    """The content hash of a file, valid while its stat key (device, inode, size, mtime_ns) is unchanged.

    Device and inode are unsigned 64-bit on Linux; they are stored as the signed integer with the same bits.
    """

    __tablename__ = "file_hash"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    dev: Mapped[int] = mapped_column(BigInteger)
    ino: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(DIGEST_LEN))


class TickRow(Base):
    """A scheduler tick that fired a run or was skipped or coalesced (schema v2)."""

    __tablename__ = "tick"
    __table_args__ = (Index("ix_tick_pipeline_due", "pipeline", "due_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(NAME_LEN))
    due_at: Mapped[datetime]
    action: Mapped[str] = mapped_column(String(STATUS_LEN))  # "fired" | "skipped" | "coalesced"
    reason: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("run.id", ondelete="SET NULL"))
    recorded_at: Mapped[datetime]


class GateBaselineRow(Base):
    """A run accepted as the baseline a gate's max_drop is measured from (`pipe gate accept`, schema v4)."""

    __tablename__ = "gate_baseline"
    __table_args__ = (Index("ix_gate_baseline_lookup", "pipeline", "stage", "metric", "accepted_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(NAME_LEN))
    stage: Mapped[str] = mapped_column(String(NAME_LEN))
    metric: Mapped[str] = mapped_column(String(128))
    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    value: Mapped[float] = mapped_column(Float)
    accepted_at: Mapped[datetime]


class ServeEventRow(Base):
    """What happened to the served model: started, stopped, promoted, promote_failed, rolled_back, healthy,
    unhealthy, restarted (schema v5). `ok` is False for a failure (a promotion refused by its health check)."""

    __tablename__ = "serve_event"
    __table_args__ = (Index("ix_serve_event_pipeline_at", "pipeline", "at", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(NAME_LEN))
    at: Mapped[datetime]
    event: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("run.id", ondelete="SET NULL"))
    digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    ok: Mapped[bool]
    detail: Mapped[str] = mapped_column(Text)
