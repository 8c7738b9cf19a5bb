"""Typed progress events and the Reporter protocol: how a run tells the console what it does.

The scheduler and api emit these; console.py implements Reporter. Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from orchestrator.results import RunSummary, StageResult


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    pipeline: str
    stages: tuple[str, ...]  # in plan order


@dataclass(frozen=True)
class StagePlanned:
    """Once a stage's first attempt has started: whether it runs and why (cache miss reasons), or is restored;
    and, for a dry run, the forecast of each stage."""

    stage: str
    will_run: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class StageStarted:
    stage: str
    attempt: int


@dataclass(frozen=True)
class StageRunning:
    """An attempt's container is about to start (a cache hit has none): history marks the stage running."""

    stage: str
    attempt: int


@dataclass(frozen=True)
class StageOutput:
    stage: str
    line: str


@dataclass(frozen=True)
class StageRetrying:
    stage: str
    attempt: int
    reason: str
    delay_s: float


@dataclass(frozen=True)
class StageFinished:
    result: StageResult


@dataclass(frozen=True)
class RunFinished:
    summary: RunSummary


@dataclass(frozen=True)
class Notice:
    """A warning for the user (a damaged cache entry, an input edited while its stage ran)."""

    message: str


@dataclass(frozen=True)
class Pushed:
    """`push: auto` sent a run's cache entries to the remote once the run ended."""

    remote: str  # its URL, s3://bucket/prefix/
    entries: int  # entries this push filed remotely
    present: int  # entries the remote had already
    files: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class BuildStarted:
    """An image build sent to the engine (images.py, before the run starts; `pipe validate` too)."""

    stage: str
    context: str  # the build context, relative to pipeline.yaml


@dataclass(frozen=True)
class BuildProgress:
    """A line of the engine's build output; `step` of `total` from its "Step 3/6 :" lines (0 before the first)."""

    stage: str
    step: int
    total: int
    line: str


@dataclass(frozen=True)
class BuildFinished:
    """`ok` False: the build failed (`log_path` keeps its full output) or was interrupted (`reason` says which)."""

    stage: str
    ok: bool
    duration_s: float
    log_path: str | None = None
    reason: str = ""


Event = (RunStarted | StagePlanned | StageStarted | StageRunning | StageOutput | StageRetrying | StageFinished
         | RunFinished | Notice | BuildStarted | BuildProgress | BuildFinished | Pushed)
BuildEvents = Callable[[Event], None]  # a Reporter's emit: BuildStarted, BuildProgress, BuildFinished, Notice


class Reporter(Protocol):
    def emit(self, event: Event) -> None:
        """Called from worker threads too: implementations must be thread-safe and fast."""
        ...


class NullReporter:
    def emit(self, event: Event) -> None:
        pass
