"""The run history API: records runs, stages, metrics and scheduler ticks, and answers what the commands ask.

Takes and returns pipe's own values (`results`, `records`); each call is one short transaction, so concurrent
`pipe` processes interleave safely. A running run whose owner is provably gone (lease.py) is answered as
interrupted, whether or not a writer has marked it yet. Knows nothing of Docker, the cache layout or the terminal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, cast

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.sql import Select

from orchestrator.errors import NotFound, StoreError
from orchestrator.hashing import HashMemo
from orchestrator.results import Artifact, RunStatus, StageResult, StageStatus
from orchestrator.store.db import WRITE, describe, one_line, open_engine
from orchestrator.store.hashmemo import SqlHashMemo
from orchestrator.store.lease import (
    HEARTBEAT_S,
    LEASE_S,
    Heartbeat,
    Leases,
    Owner,
    gone,
    process_identity,
    this_host,
)
from orchestrator.store.models import (
    ArtifactRow,
    GateBaselineRow,
    MetricRow,
    RunRow,
    ServeEventRow,
    StageRunRow,
    TickRow,
)
from orchestrator.store.records import (
    INTERRUPTED,
    TICK_ACTIONS,
    TRIGGERS,
    MetricPoint,
    RunInfo,
    ServeEventInfo,
    StageHistory,
    StageRecord,
    StageRunInfo,
    TickAction,
    TickInfo,
    Trigger,
    interrupted_view,
    new_run_id,
    seconds_between,
)

LATEST = "latest"
_WITH_DETAILS = (selectinload(StageRunRow.artifacts), selectinload(StageRunRow.metrics))
_WITH_STAGES = (selectinload(RunRow.stages).selectinload(StageRunRow.artifacts),
                selectinload(RunRow.stages).selectinload(StageRunRow.metrics))


def _now() -> datetime:
    return datetime.now(UTC)


class Store:
    """The history database at `url` (SQLite file or PostgreSQL), opened and migrated on construction.

    `read_only`: opened as it is, never created nor migrated (db.open_engine); every write raises StoreError.
    `lease_s`: how long a lease this Store writes holds (LEASE_S)."""

    def __init__(self, url: str, *, read_only: bool = False, lease_s: float = LEASE_S) -> None:
        self._name = describe(url)
        self._read_only = read_only
        self._engine = open_engine(url, read_only=read_only)
        self._writer = self._engine.execution_options(**{WRITE: True})
        self._lease = timedelta(seconds=lease_s)
        # run id -> the stages written, for the runs this Store began: no other process writes a live run's rows,
        # so a stage not in here has no row yet and recording it reads nothing first (a cached stage: one write)
        self._began: dict[str, set[str]] = {}
        self._leases = Leases(self.renew_lease)

    def close(self) -> None:
        """Stops the heartbeats of the runs this Store leased, then lets the database go."""
        self._leases.stop_all()
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # --- recording a run -----------------------------------------------------------------------------------

    def begin_run(self, pipeline: str, pipeline_path: str, pipeline_hash: str, trigger: Trigger,
                  git_commit: str | None, host: str, pid: int, params_override: dict[str, Any],
                  git_dirty: bool | None = None) -> str:
        """Record a new run as running and return its id."""
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, not {trigger!r}")
        started_at = _now()
        owner = process_identity(pid) if host == this_host() else None
        with self._write() as session:
            run_id = new_run_id(started_at)
            while session.get(RunRow, run_id) is not None:  # two runs in one second drew the same suffix
                run_id = new_run_id(started_at)
            now = _db_now(session)
            session.add(RunRow(
                id=run_id, pipeline=pipeline, pipeline_path=pipeline_path, pipeline_hash=pipeline_hash,
                trigger=trigger, status=RunStatus.RUNNING, started_at=started_at, finished_at=None,
                git_commit=git_commit, host=host, pid=pid, exit_code=None, params_override=params_override,
                owner_process=owner, heartbeat_at=now, lease_expires_at=now + self._lease, git_dirty=git_dirty))
        self._began[run_id] = set()
        return run_id

    def lease(self, run_id: str, interval_s: float = HEARTBEAT_S) -> Heartbeat:
        """Start renewing the lease of `run_id` (begun by this process) every `interval_s` until finish_run,
        mark_interrupted or close; a context manager too (`with store.lease(run_id): ...` stops it on exit)."""
        return self._leases.lease(run_id, interval_s)

    def renew_lease(self, run_id: str) -> bool:
        """Extend the lease of a running run by `lease_s` from now (the database's clock); False, changing
        nothing, when the run is no longer running (it finished, or was taken for dead and marked)."""
        with self._write() as session:
            now = _db_now(session)
            renewed = session.execute(
                update(RunRow).where(RunRow.id == run_id, RunRow.status == RunStatus.RUNNING)
                .values(heartbeat_at=now, lease_expires_at=now + self._lease)
                .execution_options(synchronize_session=False))
            return bool(getattr(renewed, "rowcount", 0))

    def mark_stage_running(self, run_id: str, stage: str, attempt: int, started_at: datetime,
                           log_path: str | None = None) -> None:
        """Record that a stage (attempt `attempt`, from 1) started; `log_path` lets `pipe logs -f` follow it."""
        with self._write() as session:
            row = self._stage_row(session, run_id, stage)
            row.status, row.reason, row.exit_code, row.attempts = None, "", None, attempt
            row.started_at, row.finished_at, row.duration_s = started_at, None, None
            row.log_path = log_path or row.log_path
            row.artifacts, row.metrics = [], []  # a retry starts clean

    def record_stage(self, run_id: str, result: StageResult, *, ingredients_json: str | None = None,
                     user: str | None = None, hermetic: bool = True, gate_passed: bool | None = None) -> None:
        """Record a stage's outcome, replacing what was recorded for it in this run (running, or an attempt)."""
        self.record_stages(run_id, [StageRecord(result, ingredients_json, user, hermetic, gate_passed)])

    def record_stages(self, run_id: str, records: Sequence[StageRecord]) -> None:
        """record_stage for each of `records`, in one transaction (a no-op run's cached stages: one commit)."""
        if not records:
            return
        with self._write() as session:
            for record in records:
                self._fill(self._stage_row(session, run_id, record.result.stage), record)

    @staticmethod
    def _fill(row: StageRunRow, record: StageRecord) -> None:
        result = record.result
        row.status, row.reason, row.exit_code = result.status, result.reason, result.exit_code
        row.attempts, row.infra_error = result.attempts, result.infra_error
        row.cache_key, row.cached_from, row.image_id = result.cache_key, result.cached_from, result.image_id
        row.started_at = result.started_at or row.started_at
        row.finished_at = result.finished_at
        row.duration_s = (row.finished_at - row.started_at).total_seconds() \
            if row.started_at and row.finished_at else None
        row.peak_memory_bytes, row.cpu_seconds = result.peak_memory_bytes, result.cpu_seconds
        row.log_path = result.log_path or row.log_path
        row.outputs_path, row.outputs_digest = result.outputs_path, result.outputs_digest
        row.user, row.hermetic, row.ingredients_json = record.user, record.hermetic, record.ingredients_json
        row.gate_passed = record.gate_passed
        row.warnings = list(result.warnings) or None
        where = result.ran_on
        row.executor, row.node, row.task_id = (where.executor, where.node, where.task_id) if where else \
            (None, None, None)
        row.artifacts = [ArtifactRow(path=a.path, size=a.size, digest=a.digest) for a in result.artifacts]
        row.metrics = [MetricRow(name=name, value=value) for name, value in sorted(result.metrics.items())]

    def finish_run(self, run_id: str, status: RunStatus, exit_code: int) -> None:
        """Record the run's end; its heartbeat stops first, so nothing renews the lease of a finished run."""
        self._leases.stop(run_id)
        with self._write() as session:
            run = self._run_row(session, run_id)
            run.status, run.exit_code, run.finished_at = status, exit_code, _now()

    def mark_interrupted(self, run_id: str, reason: str = INTERRUPTED) -> bool:
        """Mark a run whose process died as interrupted, and its running stages failed with `reason`; they end
        at the run's last heartbeat, when it was last known alive.

        Returns False, changing nothing, when the run is no longer running (it finished in the meantime).
        """
        self._leases.stop(run_id)
        with self._write() as session:
            run = self._run_row(session, run_id, selectinload(RunRow.stages))
            if run.status != RunStatus.RUNNING:
                return False
            now = run.heartbeat_at or _now()
            run.status, run.finished_at = RunStatus.INTERRUPTED, now
            for stage in run.stages:
                if stage.status is None:
                    end = max(now, stage.started_at) if stage.started_at else now
                    stage.status, stage.reason, stage.finished_at = StageStatus.FAILED, reason, end
                    stage.duration_s = seconds_between(stage.started_at, end)
            return True

    def mark_dead_runs(self, pipeline: str) -> list[str]:
        """Mark interrupted the running runs of `pipeline` whose owner is provably gone; return their ids."""
        with self._read() as session:
            rows = session.scalars(select(RunRow).where(RunRow.pipeline == pipeline,
                                                        RunRow.status == RunStatus.RUNNING)).all()
            dead = _verdicts(session, rows)
        return [run_id for run_id, why in dead.items() if self.mark_interrupted(run_id, f"{INTERRUPTED}: {why}")]

    def run_alive(self, run_id: str) -> bool | None:
        """True while `run_id` runs and its owner may be alive, False once it ended or its owner is provably
        gone, None when this history has no such run (what the orphan sweep asks of a container's run)."""
        with self._read() as session:
            row = session.get(RunRow, run_id)
            if row is None:
                return None
            return row.status == RunStatus.RUNNING and row.id not in _verdicts(session, [row])

    def record_tick(self, pipeline: str, due_at: datetime, action: TickAction, reason: str,
                    run_id: str | None = None) -> None:
        if action not in TICK_ACTIONS:
            raise ValueError(f"tick action must be one of {TICK_ACTIONS}, not {action!r}")
        with self._write() as session:
            session.add(TickRow(pipeline=pipeline, due_at=due_at, action=action, reason=reason, run_id=run_id,
                                recorded_at=_now()))

    def hash_memo(self) -> HashMemo:
        """A HashMemo (orchestrator.hashing) over the `file_hash` table; call its flush() when done (on a
        read-only Store flush() writes nothing: what was hashed is remembered by the next `pipe run`)."""
        return SqlHashMemo(self._read, None if self._read_only else self._write)

    # --- asking ------------------------------------------------------------------------------------------------

    def latest_run(self, pipeline: str) -> RunInfo | None:
        with self._read() as session:
            row = session.scalars(_newest(pipeline).options(*_WITH_STAGES).limit(1)).first()
            return _run_infos(session, [row], with_stages=True)[0] if row else None

    def get_run(self, ref: str, pipeline: str) -> RunInfo:
        """The run of `pipeline` named by its id, a unique prefix of it, or "latest"; NotFound otherwise."""
        if ref == LATEST:
            if (latest := self.latest_run(pipeline)) is None:
                raise NotFound(f"pipeline {pipeline} has no runs yet; start one with `pipe run`")
            return latest
        with self._read() as session:
            ids = session.scalars(select(RunRow.id).where(
                RunRow.pipeline == pipeline, RunRow.id.startswith(ref, autoescape=True)).limit(11)).all()
            if ref not in ids and len(ids) != 1:
                if not ids:
                    raise NotFound(f"run {ref} is not in the history of pipeline {pipeline}; see `pipe runs`")
                many = "more than 10" if len(ids) > 10 else str(len(ids))
                raise NotFound(f"run {ref} matches {many} runs of pipeline {pipeline}; give more of the id")
            run_id = ref if ref in ids else ids[0]
            row = session.scalars(select(RunRow).where(RunRow.id == run_id).options(*_WITH_STAGES)).one()
            return _run_infos(session, [row], with_stages=True)[0]

    def list_runs(self, pipeline: str, status: RunStatus | None = None, trigger: Trigger | None = None,
                  limit: int = 20, with_stages: bool = False) -> list[RunInfo]:
        """Runs of `pipeline`, newest first; their stages only when `with_stages` (otherwise `stages` is ()).

        `status` filters by the status as answered: a running run whose owner is gone counts as interrupted."""
        query = _newest(pipeline)
        if trigger is not None:
            query = query.where(RunRow.trigger == trigger)
        if with_stages:
            query = query.options(*_WITH_STAGES)
        with self._read() as session:
            if status not in (RunStatus.RUNNING, RunStatus.INTERRUPTED):
                rows = session.scalars((query if status is None else query.where(RunRow.status == status))
                                       .limit(limit)).all()
                return _run_infos(session, rows, with_stages)
            # running rows may answer as interrupted: take them all (few) besides `limit` interrupted ones
            rows = session.scalars(query.where(RunRow.status == RunStatus.RUNNING)).all()
            if status is RunStatus.INTERRUPTED:
                rows = [*rows, *session.scalars(query.where(RunRow.status == RunStatus.INTERRUPTED).limit(limit))]
                rows.sort(key=lambda r: (r.started_at, r.id), reverse=True)
            return [info for info in _run_infos(session, rows, with_stages) if info.status is status][:limit]

    def running_runs(self, pipeline: str) -> list[RunInfo]:
        """Runs still running, as far as anyone can tell: those whose owner is provably gone are left out."""
        return self.list_runs(pipeline, status=RunStatus.RUNNING, limit=1_000_000, with_stages=True)

    def last_success(self, pipeline: str, stage: str) -> StageRunInfo | None:
        """The latest record of `stage` that succeeded, or was cached and kept its ingredients: what a cache
        miss is explained against."""
        candidate = and_(StageRunRow.stage == stage, or_(
            StageRunRow.status == StageStatus.SUCCEEDED,
            and_(StageRunRow.status == StageStatus.CACHED, StageRunRow.ingredients_json.is_not(None))))
        # Walk the pipeline's runs newest first (ix_run_pipeline_started) and probe each by (run_id, stage):
        # stops at the first hit, where filtering stage_run by stage first would sort every record of it.
        latest = _newest(pipeline).with_only_columns(RunRow.id) \
            .where(select(StageRunRow.id).where(StageRunRow.run_id == RunRow.id, candidate).exists()).limit(1)
        query = select(StageRunRow).where(StageRunRow.run_id == latest.scalar_subquery(), StageRunRow.stage == stage) \
            .options(*_WITH_DETAILS)
        with self._read() as session:
            row = session.scalars(query).first()
            return _stage_info(row) if row else None

    def stage_histories(self, pipeline: str, exclude_run: str | None = None) -> dict[str, StageHistory]:
        """Every stage of `pipeline` with a finished record -> its last_success and last_record, in one query
        (plus one per detail table for the rows found): what a forecast or a run reads of history, whatever the
        number of stages. A stage absent from the result has neither. `exclude_run`'s records are left out.

        Both are picked with ROW_NUMBER() over the pipeline's finished stage records, newest run first (the
        order of last_success and last_record); window functions are SQLite >= 3.25 and PostgreSQL alike."""
        candidate = or_(StageRunRow.status == StageStatus.SUCCEEDED,
                        and_(StageRunRow.status == StageStatus.CACHED, StageRunRow.ingredients_json.is_not(None)))
        is_candidate = case((candidate, 1), else_=0)
        newest = (RunRow.started_at.desc(), RunRow.id.desc())
        ranked = (select(StageRunRow.id.label("id"), is_candidate.label("candidate"),
                         func.row_number().over(partition_by=StageRunRow.stage, order_by=newest).label("nth"),
                         func.row_number().over(partition_by=(StageRunRow.stage, is_candidate),
                                                order_by=newest).label("nth_of_kind"))
                  .join(RunRow, StageRunRow.run_id == RunRow.id)
                  .where(RunRow.pipeline == pipeline, StageRunRow.status.is_not(None),
                         *([RunRow.id != exclude_run] if exclude_run else []))
                  .subquery())
        query = (select(StageRunRow, ranked.c.nth, ranked.c.candidate, ranked.c.nth_of_kind)
                 .join(ranked, ranked.c.id == StageRunRow.id)
                 .where(or_(ranked.c.nth == 1, and_(ranked.c.candidate == 1, ranked.c.nth_of_kind == 1)))
                 .options(*_WITH_DETAILS))
        success: dict[str, StageRunInfo] = {}
        record: dict[str, StageRunInfo] = {}
        with self._read() as session:
            for row, nth, is_success, nth_of_kind in session.execute(query):
                info = _stage_info(row)
                if nth == 1:
                    record[row.stage] = info
                if is_success == 1 and nth_of_kind == 1:
                    success[row.stage] = info
        return {stage: StageHistory(success.get(stage), record.get(stage)) for stage in record}

    def last_record(self, pipeline: str, stage: str) -> StageRunInfo | None:
        """The latest finished record of `stage` in `pipeline`, whatever its status: how it last ended."""
        query = (select(StageRunRow).join(StageRunRow.run)
                 .where(RunRow.pipeline == pipeline, StageRunRow.stage == stage, StageRunRow.status.is_not(None))
                 .order_by(RunRow.started_at.desc(), RunRow.id.desc()).limit(1).options(*_WITH_DETAILS))
        with self._read() as session:
            row = session.scalars(query).first()
            return _stage_info(row) if row else None

    def metric_history(self, pipeline: str, limit: int = 20) -> list[MetricPoint]:
        """Every metric of the latest `limit` runs that recorded any, newest run first, then stage and name."""
        has_metrics = (select(MetricRow.id).join(StageRunRow, MetricRow.stage_run_id == StageRunRow.id)
                       .where(StageRunRow.run_id == RunRow.id).exists())
        recent = select(RunRow.id).where(RunRow.pipeline == pipeline, has_metrics) \
            .order_by(RunRow.started_at.desc()).limit(limit)
        query = (select(RunRow.id, RunRow.started_at, StageRunRow.stage, MetricRow.name, MetricRow.value)
                 .join(StageRunRow, StageRunRow.run_id == RunRow.id)
                 .join(MetricRow, MetricRow.stage_run_id == StageRunRow.id)
                 .where(RunRow.id.in_(recent))
                 .order_by(RunRow.started_at.desc(), StageRunRow.stage, MetricRow.name))
        with self._read() as session:
            return [MetricPoint(*row) for row in session.execute(query)]

    def accept_gate(self, pipeline: str, stage: str, metric: str, run_id: str, value: float) -> None:
        """Record `run_id`'s `metric` as the baseline the stage's gate measures max_drop from (`pipe gate accept`)."""
        with self._write() as session:
            self._run_row(session, run_id)
            session.add(GateBaselineRow(pipeline=pipeline, stage=stage, metric=metric, run_id=run_id, value=value,
                                        accepted_at=_now()))

    def gate_baseline(self, pipeline: str, stage: str, metric: str) -> tuple[str, float] | None:
        """(run id, value of `metric`) that a gate's max_drop is measured from: the newer of the latest run in which
        the stage passed its gate (by the run's start) and the latest accepted baseline (by when it was accepted)."""
        passed = (select(RunRow.started_at, RunRow.id, MetricRow.value)
                  .join(StageRunRow, StageRunRow.run_id == RunRow.id)
                  .join(MetricRow, MetricRow.stage_run_id == StageRunRow.id)
                  .where(RunRow.pipeline == pipeline, StageRunRow.stage == stage,
                         StageRunRow.gate_passed.is_(True), MetricRow.name == metric)
                  .order_by(RunRow.started_at.desc()).limit(1))
        accepted = (select(GateBaselineRow.accepted_at, GateBaselineRow.run_id, GateBaselineRow.value)
                    .where(GateBaselineRow.pipeline == pipeline, GateBaselineRow.stage == stage,
                           GateBaselineRow.metric == metric)
                    .order_by(GateBaselineRow.accepted_at.desc(), GateBaselineRow.id.desc()).limit(1))
        with self._read() as session:
            found = [row for row in (session.execute(passed).first(), session.execute(accepted).first()) if row]
        if not found:
            return None
        _, run_id, value = max(found, key=lambda row: row[0])
        return run_id, value

    def referenced_cache_keys(self, keep_runs: int | None, keep_days: float | None) -> set[str]:
        """Cache keys that the newest `keep_runs` runs or the runs of the last `keep_days` days (of every
        pipeline in this database) recorded, plus those of running runs; every key when both are None."""
        keep: list[Any] = [RunRow.status == RunStatus.RUNNING]
        if keep_runs is not None:
            keep.append(RunRow.id.in_(select(RunRow.id).order_by(RunRow.started_at.desc()).limit(keep_runs)))
        if keep_days is not None:
            keep.append(RunRow.started_at >= _now() - timedelta(days=keep_days))
        query = select(StageRunRow.cache_key).distinct().where(StageRunRow.cache_key.is_not(None))
        if keep_runs is not None or keep_days is not None:
            query = query.join(StageRunRow.run).where(or_(*keep))
        with self._read() as session:
            return {key for key in session.scalars(query) if key is not None}

    def ticks(self, pipeline: str, limit: int = 20) -> list[TickInfo]:
        """The scheduler's latest ticks of `pipeline`, newest due time first."""
        query = select(TickRow).where(TickRow.pipeline == pipeline) \
            .order_by(TickRow.due_at.desc(), TickRow.id.desc()).limit(limit)
        with self._read() as session:
            return [TickInfo(pipeline=t.pipeline, due_at=t.due_at, action=cast(TickAction, t.action),
                             reason=t.reason, run_id=t.run_id, recorded_at=t.recorded_at)
                    for t in session.scalars(query)]

    # --- serving (issue 18) --------------------------------------------------------------------------------

    def record_serve_event(self, pipeline: str, event: str, run_id: str | None = None, digest: str | None = None,
                           ok: bool = True, detail: str = "") -> ServeEventInfo:
        """Record one serving event of `pipeline` (a run id not in history is kept as None, never refused)."""
        with self._write() as session:
            known = run_id if run_id is None or session.get(RunRow, run_id) is not None else None
            row = ServeEventRow(pipeline=pipeline, at=_now(), event=event, run_id=known, digest=digest, ok=ok,
                                detail=detail)
            session.add(row)
            session.flush()
            return _serve_event_info(row)

    def serve_events(self, pipeline: str, limit: int | None = 50) -> list[ServeEventInfo]:
        """`pipeline`'s serving events, newest first."""
        query = select(ServeEventRow).where(ServeEventRow.pipeline == pipeline) \
            .order_by(ServeEventRow.at.desc(), ServeEventRow.id.desc()).limit(limit)
        with self._read() as session:
            return [_serve_event_info(row) for row in session.scalars(query)]

    # --- sessions and rows ---------------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        try:
            with Session(self._engine) as session, session.begin():
                yield session
        except SQLAlchemyError as e:
            raise StoreError(f"database {self._name} cannot be read: {one_line(e)}") from e

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction, committed on exit (on SQLite it holds the write lock from the start)."""
        if self._read_only:
            raise StoreError(f"database {self._name} was opened read-only; only `pipe run` writes history")
        try:
            with Session(self._writer) as session, session.begin():
                yield session
        except SQLAlchemyError as e:
            raise StoreError(f"database {self._name} cannot be written: {one_line(e)}") from e

    def _run_row(self, session: Session, run_id: str, *options: Any) -> RunRow:
        row = session.get(RunRow, run_id, options=options)
        if row is None:
            raise NotFound(f"run {run_id} is not in the history database {self._name}")
        return row

    def _stage_row(self, session: Session, run_id: str, stage: str) -> StageRunRow:
        """The stage's row in this run, with artifacts and metrics loaded; a new one if it has none yet."""
        began = self._began.get(run_id)
        row = None
        if began is None or stage in began:
            row = session.scalars(select(StageRunRow).where(StageRunRow.run_id == run_id, StageRunRow.stage == stage)
                                  .options(*_WITH_DETAILS)).first()
        if row is None:
            if began is None:
                self._run_row(session, run_id)
            else:
                began.add(stage)  # before the commit: should it fail, the next write looks the row up again
            row = StageRunRow(run_id=run_id, stage=stage, status=None, reason="", attempts=0, infra_error=False,
                              hermetic=True, artifacts=[], metrics=[])
            session.add(row)
        return row

    # --- read-only views for compare, metrics, plot, report and ui (issue 19) ---------------------------------

    def runs_window(self, pipeline: str, *, since: datetime | None = None, before: datetime | None = None,
                    limit: int = 50, offset: int = 0, with_stages: bool = True) -> list[RunInfo]:
        """Runs of `pipeline` started at or after `since` (and before `before`), newest first, `offset` skipped."""
        query = _newest(pipeline)
        if since is not None:
            query = query.where(RunRow.started_at >= since)
        if before is not None:
            query = query.where(RunRow.started_at < before)
        if with_stages:
            query = query.options(*_WITH_STAGES)
        with self._read() as session:
            return _run_infos(session, session.scalars(query.offset(offset).limit(limit)).all(), with_stages)

    def count_runs(self, pipeline: str) -> int:
        with self._read() as session:
            return session.scalar(select(func.count()).select_from(RunRow).where(RunRow.pipeline == pipeline)) or 0

    def latest_gate_pass(self, pipeline: str) -> str | None:
        """The id of the latest succeeded run of `pipeline` in which a stage passed its gate, or None."""
        passed = select(StageRunRow.id).where(StageRunRow.run_id == RunRow.id, StageRunRow.gate_passed.is_(True))
        query = _newest(pipeline).with_only_columns(RunRow.id) \
            .where(RunRow.status == RunStatus.SUCCEEDED, passed.exists()).limit(1)
        with self._read() as session:
            return session.scalars(query).first()

    def latest_success_run(self, pipeline: str) -> str | None:
        query = _newest(pipeline).with_only_columns(RunRow.id).where(RunRow.status == RunStatus.SUCCEEDED).limit(1)
        with self._read() as session:
            return session.scalars(query).first()


def _newest(pipeline: str) -> Select[RunRow]:
    return select(RunRow).where(RunRow.pipeline == pipeline).order_by(RunRow.started_at.desc(), RunRow.id.desc())


def _db_now(session: Session) -> datetime:
    """The database's clock, which every lease is written and judged by: hosts sharing a database may disagree
    on the time, the database agrees with itself (SQLite: this host's clock, to the second)."""
    value = session.execute(select(func.current_timestamp())).scalar_one()
    if isinstance(value, str):  # SQLite without a typed column: "YYYY-MM-DD HH:MM:SS", UTC
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _verdicts(session: Session, rows: Sequence[RunRow]) -> dict[str, str]:
    """Run id -> why its owner is gone, for the running rows among `rows` whose owner is provably gone."""
    running = [row for row in rows if row.status == RunStatus.RUNNING]
    if not running:
        return {}
    now, host = _db_now(session), this_host()
    verdicts = {row.id: gone(Owner(row.host, row.pid, row.owner_process, row.lease_expires_at),
                                   now, host) for row in running}
    return {run_id: why for run_id, why in verdicts.items() if why is not None}


def _run_infos(session: Session, rows: Sequence[RunRow], with_stages: bool) -> list[RunInfo]:
    """The rows as answered: a running one whose owner is gone as interrupted, as mark_interrupted would."""
    dead = _verdicts(session, rows)
    infos = []
    for row in rows:
        info = _run_info(row, with_stages)
        if row.id in dead:
            info = interrupted_view(info, row.heartbeat_at or _db_now(session), f"{INTERRUPTED}: {dead[row.id]}")
        infos.append(info)
    return infos


def _run_info(row: RunRow, with_stages: bool) -> RunInfo:
    stages: Sequence[StageRunRow] = row.stages if with_stages else ()
    return RunInfo(
        id=row.id, pipeline=row.pipeline, pipeline_path=row.pipeline_path, pipeline_hash=row.pipeline_hash,
        trigger=cast(Trigger, row.trigger), status=row.status, started_at=row.started_at,
        finished_at=row.finished_at, git_commit=row.git_commit, host=row.host, pid=row.pid,
        exit_code=row.exit_code, params_override=dict(row.params_override), git_dirty=row.git_dirty,
        stages=tuple(_stage_info(s) for s in stages))


def _stage_info(row: StageRunRow) -> StageRunInfo:
    return StageRunInfo(
        stage=row.stage, status=row.status, reason=row.reason, exit_code=row.exit_code, attempts=row.attempts,
        infra_error=row.infra_error, cache_key=row.cache_key, cached_from=row.cached_from, image_id=row.image_id,
        started_at=row.started_at, finished_at=row.finished_at, duration_s=row.duration_s,
        peak_memory_bytes=row.peak_memory_bytes, cpu_seconds=row.cpu_seconds, log_path=row.log_path,
        outputs_path=row.outputs_path, outputs_digest=row.outputs_digest, user=row.user, hermetic=row.hermetic,
        ingredients_json=row.ingredients_json,
        artifacts=tuple(Artifact(path=a.path, size=a.size, digest=a.digest) for a in row.artifacts),
        metrics={m.name: m.value for m in row.metrics}, gate_passed=row.gate_passed,
        warnings=tuple(row.warnings or ()), executor=row.executor, node=row.node, task_id=row.task_id)


def _serve_event_info(row: ServeEventRow) -> ServeEventInfo:
    return ServeEventInfo(pipeline=row.pipeline, at=row.at, event=row.event, run_id=row.run_id, digest=row.digest,
                          ok=row.ok, detail=row.detail)
