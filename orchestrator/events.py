"""Typed progress events and the Reporter protocol: how a run tells the console what it does.

The scheduler and api emit these; console.py implements Reporter. Nothing here prints.
"""

from __future__ import annotations

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
    """Before anything runs: whether the stage will run and why (cache miss reasons), or be restored."""

    stage: str
    will_run: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class StageStarted:
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
class Warning:
    message: str


Event = RunStarted | StagePlanned | StageStarted | StageOutput | StageRetrying | StageFinished | RunFinished | Warning


class Reporter(Protocol):
    def emit(self, event: Event) -> None:
        """Called from worker threads too: implementations must be thread-safe and fast."""
        ...


class NullReporter:
    def emit(self, event: Event) -> None:
        pass
