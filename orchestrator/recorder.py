"""The one writer of a run's stage records: a Reporter that writes history from the events parallel and the
runner emit, then passes each event on. Every final StageResult reaches it (StageFinished), including a stage
that raised inside pipe (parallel turns that into a FAILED result), so no stage stays "running" in a finished run.
"""

from __future__ import annotations

from datetime import UTC, datetime

from orchestrator.events import Event, Reporter, StageFinished, StageRunning
from orchestrator.runner import container_user
from orchestrator.spec import Pipeline
from orchestrator.state import StateDir
from orchestrator.store.store import Store


class Recorder:
    """Reporter: StageRunning -> the stage marked running (so `pipe logs -f` finds its log); StageFinished -> its
    final record. Thread-safe as far as the store is (each write is its own transaction)."""

    def __init__(self, store: Store, run_id: str, pipeline: Pipeline, state: StateDir, inner: Reporter) -> None:
        self._store, self._run_id, self._pipeline, self._state, self._inner = store, run_id, pipeline, state, inner

    def emit(self, event: Event) -> None:
        match event:
            case StageRunning(stage=stage, attempt=attempt):
                self._store.mark_stage_running(self._run_id, stage, attempt, datetime.now(UTC),
                                               log_path=str(self._state.log_path(self._run_id, stage)))
            case StageFinished(result=result):
                spec = self._pipeline.stages[result.stage]
                self._store.record_stage(self._run_id, result, ingredients_json=result.ingredients_json,
                                         user=container_user(spec.user), hermetic=not spec.network,
                                         gate_passed=result.gate_passed)
        self._inner.emit(event)
