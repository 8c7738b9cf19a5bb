"""What happened to each stage and to the run: plain frozen values passed from parallel to store and console."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from orchestrator.errors import ExitCode
from orchestrator.executor import Outcome, RanOn


class StageStatus(StrEnum):
    """Values are exactly what the CLI and --json show."""

    SUCCEEDED = "succeeded"
    CACHED = "cached"
    FAILED = "failed"
    SKIPPED = "skipped"  # an upstream stage failed, or the run stopped early
    CANCELLED = "cancelled"  # interrupted while running


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the pipe process died (crash, SIGKILL); found by a later command


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the stage's output folder
    size: int
    digest: str


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: StageStatus
    reason: str = ""  # one line for people; logic reads `outcome` and the flags, never this text
    exit_code: int | None = None
    attempts: int = 0
    infra_error: bool = False  # the engine or the machine failed, not the stage's own code
    outcome: Outcome | None = None  # how its container ended; None when none ran (cached, skipped, pipe failed)
    disk_full: bool = False  # the stage failed because a disk filled up (ENOSPC)
    node_lost: bool = False  # the cluster node it ran on was lost mid-attempt (what retry_on node_lost matches)
    cache_key: str | None = None
    cached_from: str | None = None  # the run whose outputs were restored
    image_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None
    log_path: str | None = None
    outputs_path: str | None = None
    outputs_digest: str | None = None
    artifacts: tuple[Artifact, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    ingredients_json: str | None = None  # what its cache key was made of, to explain the next miss
    gate_passed: bool | None = None  # None: no gate, or no metrics to judge, or --no-gate
    warnings: tuple[str, ...] = ()  # e.g. an input changed while the stage ran (then its outputs are not cached)
    ran_on: RanOn | None = None  # where its last attempt ran; None when none ran (cached, skipped)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def ok(self) -> bool:
        return self.status in (StageStatus.SUCCEEDED, StageStatus.CACHED)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    status: RunStatus
    results: dict[str, StageResult]
    exit_code: ExitCode
