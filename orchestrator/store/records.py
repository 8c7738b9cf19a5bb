"""The frozen values the history store returns, and their stable `--json` form.

Plain dataclasses: no SQLAlchemy here, so commands and the console can import them cheaply.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from orchestrator.results import Artifact, RunStatus, StageResult, StageStatus

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from orchestrator.hashing import HashMemo

Trigger = Literal["manual", "schedule"]
TRIGGERS: tuple[Trigger, ...] = ("manual", "schedule")
TickAction = Literal["fired", "skipped", "coalesced"]
TICK_ACTIONS: tuple[TickAction, ...] = ("fired", "skipped", "coalesced")
RUNNING = "running"  # what --json shows for a stage whose status is still None
INTERRUPTED = "interrupted"  # the reason of a stage whose run's owner died while it ran


def new_run_id(moment: datetime) -> str:
    """Sortable by start time to the second, unique by 4 random hex digits: "20261121-235959-ab12"."""
    return f"{moment.astimezone(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a `Z`, the one time format of --json."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class StageRunInfo:
    """One stage of one run as recorded; `status` is None while the stage is still running."""

    stage: str
    status: StageStatus | None
    reason: str
    exit_code: int | None
    attempts: int
    infra_error: bool
    cache_key: str | None
    cached_from: str | None
    image_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    peak_memory_bytes: int | None
    cpu_seconds: float | None
    log_path: str | None
    outputs_path: str | None
    outputs_digest: str | None
    user: str | None
    hermetic: bool
    ingredients_json: str | None  # the cache key's ingredients (secrets never enter them), for explaining misses
    artifacts: tuple[Artifact, ...]
    metrics: dict[str, float]
    gate_passed: bool | None  # None: the stage has no gate, or it was not checked (--no-gate)
    warnings: tuple[str, ...] = ()  # e.g. an input changed while the stage ran
    executor: str | None = None  # where its last attempt ran: local | swarm | kubernetes (None: none ran)
    node: str | None = None
    task_id: str | None = None  # the container, swarm task or Job of that attempt

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": str(self.status) if self.status is not None else RUNNING,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "attempts": self.attempts,
            "infra_error": self.infra_error,
            "cache_key": self.cache_key,
            "cached_from": self.cached_from,
            "image_id": self.image_id,
            "started_at": iso_utc(self.started_at),
            "finished_at": iso_utc(self.finished_at),
            "duration_s": self.duration_s,
            "peak_memory_bytes": self.peak_memory_bytes,
            "cpu_seconds": self.cpu_seconds,
            "log_path": self.log_path,
            "outputs_path": self.outputs_path,
            "outputs_digest": self.outputs_digest,
            "user": self.user,
            "hermetic": self.hermetic,
            "ingredients": json.loads(self.ingredients_json) if self.ingredients_json else None,
            "artifacts": [{"path": a.path, "size": a.size, "digest": a.digest} for a in self.artifacts],
            "metrics": dict(sorted(self.metrics.items())),
            "gate_passed": self.gate_passed,
            "warnings": list(self.warnings),
            "executor": self.executor,
            "node": self.node,
            "task_id": self.task_id,
        }


@dataclass(frozen=True)
class StageHistory:
    """What a decision reads of one stage's history (decide.History): its latest record that succeeded (or was
    cached with its ingredients), and its latest finished record whatever the status."""

    last_success: StageRunInfo | None
    last_record: StageRunInfo | None


@dataclass(frozen=True)
class RunInfo:
    """One run; `stages` is empty when the run was listed without its stages (`list_runs`)."""

    id: str
    pipeline: str
    pipeline_path: str
    pipeline_hash: str
    trigger: Trigger
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    git_commit: str | None
    host: str
    pid: int
    exit_code: int | None
    params_override: dict[str, Any]
    stages: tuple[StageRunInfo, ...]
    git_dirty: bool | None = None  # None: unknown (not a git tree, or recorded before schema v4)

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def stage(self, name: str) -> StageRunInfo | None:
        return next((s for s in self.stages if s.stage == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "pipeline_path": self.pipeline_path,
            "pipeline_hash": self.pipeline_hash,
            "trigger": self.trigger,
            "status": str(self.status),
            "started_at": iso_utc(self.started_at),
            "finished_at": iso_utc(self.finished_at),
            "duration_s": self.duration_s,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
            "host": self.host,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "params_override": self.params_override,
            "stages": [s.to_json() for s in self.stages],
        }


@dataclass(frozen=True)
class MetricPoint:
    """One number a stage's metrics.json reported in one run."""

    run_id: str
    started_at: datetime
    stage: str
    name: str
    value: float

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started_at": iso_utc(self.started_at), "stage": self.stage,
                "name": self.name, "value": self.value}


@dataclass(frozen=True)
class TickInfo:
    """What the scheduler did with one due tick: fired a run, or skipped/coalesced it and why."""

    pipeline: str
    due_at: datetime
    action: TickAction
    reason: str
    run_id: str | None
    recorded_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "due_at": iso_utc(self.due_at), "action": self.action,
                "reason": self.reason, "run_id": self.run_id, "recorded_at": iso_utc(self.recorded_at)}


@dataclass(frozen=True)
class ServeEventInfo:
    """One recorded serving event (`pipe serve status --history`)."""

    pipeline: str
    at: datetime
    event: str
    run_id: str | None
    digest: str | None
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"at": iso_utc(self.at), "event": self.event, "run_id": self.run_id, "digest": self.digest,
                "ok": self.ok, "detail": self.detail}


def interrupted_view(info: RunInfo, at: datetime, reason: str) -> RunInfo:
    """A running run whose owner is provably gone, as answered before any command marks it: interrupted at
    `at`, its unfinished stages failed with `reason` (what Store.mark_interrupted writes)."""
    stages = tuple(_failed_at(s, at, reason) if s.status is None else s for s in info.stages)
    return replace(info, status=RunStatus.INTERRUPTED, finished_at=at, stages=stages)


def _failed_at(stage: StageRunInfo, at: datetime, reason: str) -> StageRunInfo:
    end = max(at, stage.started_at) if stage.started_at else at  # it may have started after the last heartbeat
    return replace(stage, status=StageStatus.FAILED, reason=reason, finished_at=end,
                   duration_s=seconds_between(stage.started_at, end))


def seconds_between(start: datetime | None, end: datetime) -> float | None:
    return (end - start).total_seconds() if start else None


class HistoryReads(Protocol):
    """What a forecast and `pipe status` read of history: Store answers it, and on a SQLite file so does
    sqlite_reader.SqliteHistory, without SQLAlchemy."""

    def latest_run(self, pipeline: str) -> RunInfo | None: ...

    def stage_histories(self, pipeline: str, exclude_run: str | None = None) -> dict[str, StageHistory]: ...

    def hash_memo(self) -> HashMemo: ...


@dataclass(frozen=True)
class StageRecord:
    """One stage's outcome as record_stages writes it."""

    result: StageResult
    ingredients_json: str | None = None
    user: str | None = None
    hermetic: bool = True
    gate_passed: bool | None = None


class RunHistory(HistoryReads, Protocol):
    """What `pipe run` reads and writes of history: Store answers it, and on a SQLite file at the current schema
    so does sqlite_writer.SqliteRunStore, without SQLAlchemy."""

    def mark_dead_runs(self, pipeline: str) -> list[str]: ...

    def run_alive(self, run_id: str) -> bool | None: ...

    def begin_run(self, pipeline: str, pipeline_path: str, pipeline_hash: str, trigger: Trigger,
                  git_commit: str | None, host: str, pid: int, params_override: dict[str, Any],
                  git_dirty: bool | None = None) -> str: ...

    def lease(self, run_id: str, interval_s: float = ...) -> AbstractContextManager[Any]:
        """Renew the run's lease until finish_run or close (lease.Heartbeat)."""

    def mark_stage_running(self, run_id: str, stage: str, attempt: int, started_at: datetime,
                           log_path: str | None = None) -> None: ...

    def record_stages(self, run_id: str, records: Sequence[StageRecord]) -> None: ...

    def finish_run(self, run_id: str, status: RunStatus, exit_code: int) -> None: ...

    def gate_baseline(self, pipeline: str, stage: str, metric: str) -> tuple[str, float] | None: ...

    def serve_events(self, pipeline: str, limit: int | None = 50) -> list[ServeEventInfo]: ...

    def close(self) -> None: ...
