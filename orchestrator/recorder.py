"""The one writer of a run's stage records: a Reporter that writes history from the events parallel and the
runner emit, then passes each event on. Every final StageResult reaches it (StageFinished), including a stage
that raised inside pipe (parallel turns that into a FAILED result), so no stage stays "running" in a finished run.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from orchestrator.events import Event, Reporter, StageFinished, StageRunning
from orchestrator.results import StageStatus
from orchestrator.runner import container_user
from orchestrator.spec import Pipeline
from orchestrator.state import StateDir
from orchestrator.store.records import RunHistory, StageRecord


class Recorder:
    """Reporter: StageRunning -> the stage marked running (so `pipe logs -f` finds its log); StageFinished -> its
    final record. A cached stage's record waits, with the others restored meanwhile, until a stage starts to
    run or the run ends (flush): a no-op run of 100 stages commits once, not 100 times. A crash loses only such
    records, and history then answers from the runs before, as if those stages had not been reached.
    Thread-safe."""

    def __init__(self, store: RunHistory, run_id: str, pipeline: Pipeline, state: StateDir, inner: Reporter) -> None:
        self._store, self._run_id, self._pipeline, self._state, self._inner = store, run_id, pipeline, state, inner
        self._waiting: list[StageRecord] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        match event:
            case StageRunning(stage=stage, attempt=attempt):
                self.flush()
                self._store.mark_stage_running(self._run_id, stage, attempt, datetime.now(UTC),
                                               log_path=str(self._state.log_path(self._run_id, stage)))
            case StageFinished(result=result):
                spec = self._pipeline.stages[result.stage]
                record = StageRecord(result, result.ingredients_json, container_user(spec.user), not spec.network,
                                     result.gate_passed)
                if result.status is StageStatus.CACHED:
                    with self._lock:
                        self._waiting.append(record)
                else:
                    self.flush()
                    self._store.record_stages(self._run_id, [record])
        self._inner.emit(event)

    def flush(self) -> None:
        """Write the records waiting, in one transaction; before the run is finished, and before a stage runs."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        self._store.record_stages(self._run_id, waiting)
