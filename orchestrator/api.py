"""The use cases behind the commands; the only module that wires the real parts together.

Each function takes plain arguments and returns plain values (results, records, strings); console.py renders
them. Run: load → plan → lock → recover → images → hash inputs → execute → record (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from orchestrator import loader
from orchestrator.errors import ExitCode, StoreError, UsageError
from orchestrator.events import Notice, NullReporter, Reporter, RunFinished, RunStarted
from orchestrator.overrides import apply_overrides, parse_overrides
from orchestrator.plan import Plan, Selection, build_plan
from orchestrator.results import RunStatus, RunSummary, StageResult, StageStatus
from orchestrator.spec import Pipeline, Schedule
from orchestrator.state import StateDir
from orchestrator.store.records import (
    HistoryReads,
    MetricPoint,
    RunHistory,
    RunInfo,
    StageHistory,
    StageRunInfo,
    TickAction,
    TickInfo,
)

if TYPE_CHECKING:  # SQLAlchemy, Docker and the runner are imported by the commands that use them
    from orchestrator.backend import Backend
    from orchestrator.cache import GcReport, Manifest, VerifyReport
    from orchestrator.cachestore import CacheStore
    from orchestrator.cron import CrontabEntry
    from orchestrator.decide import Decision
    from orchestrator.imageplan import ImageForecast
    from orchestrator.logstore import LogStore
    from orchestrator.parallel import Demand, Execution
    from orchestrator.prune import DiskUse
    from orchestrator.runner import StageRunner, Upstream
    from orchestrator.store.store import Store

H = TypeVar("H", bound=RunHistory)


@dataclass(frozen=True)
class Target:
    """Which pipeline and where its state is: what every command starts from."""

    pipeline_path: Path = Path("pipeline.yaml")
    state_dir: Path | None = None  # --state-dir / PIPE_STATE_DIR; default runs/ beside the file
    db_url: str | None = None  # --db / PIPE_DB; default sqlite in the state dir


@dataclass(frozen=True)
class RunRequest:
    target: Target = field(default_factory=Target)
    selection: Selection = field(default_factory=Selection)
    jobs: int | None = None
    keep_going: bool = False
    force: frozenset[str] | bool = False  # True: every stage
    wait: bool = False
    timeout_s: float | None = None
    params: tuple[str, ...] = ()  # "train.n_estimators=300"
    trigger: Literal["manual", "schedule"] = "manual"
    docker_url: str | None = None
    gate: bool = True  # False: --no-gate, the gates are not checked (recorded as a warning)
    executor: Literal["local", "swarm", "kubernetes"] | None = None  # --executor; None: the file's executor.kind
    kube_context: str | None = None  # --kube-context; None: the file's executor.context (or the current one)
    fetch: Literal["none", "final", "all"] = "final"  # --fetch: which outputs a cluster run brings to this host


@dataclass
class Cancel:
    """Set from a signal handler; `signal` says which exit code the run ends with."""

    event: threading.Event = field(default_factory=threading.Event)
    exit_code: ExitCode = ExitCode.INTERRUPTED

    def set(self, exit_code: ExitCode) -> None:
        self.exit_code = exit_code
        self.event.set()


@dataclass(frozen=True)
class Loaded:
    pipeline: Pipeline
    state: StateDir
    db_url: str


def load(target: Target) -> Loaded:
    pipeline = loader.load_pipeline(target.pipeline_path)
    state = StateDir.for_pipeline(pipeline.root, target.state_dir)
    return Loaded(pipeline, state, target.db_url or state.default_db_url)


@contextmanager
def open_store(loaded: Loaded) -> Iterator[Store]:
    """The history to write (the scheduler, serving, maintenance): created or migrated as needed, and the
    pipeline's runs whose owner is provably gone (store/lease.py) marked interrupted."""
    from orchestrator.store.store import Store

    loaded.state.ensure()
    with _marked(Store(loaded.db_url), loaded) as store:
        yield store


@contextmanager
def open_run_history(loaded: Loaded) -> Iterator[RunHistory]:
    """open_store for `pipe run`: on a SQLite file already at the current schema, written with the standard
    library (store/sqlite_writer.py), so a run does not import SQLAlchemy (issue 20); Store otherwise, which
    creates, upgrades or refuses the database."""
    from orchestrator.store.sqlite_reader import sqlite_path

    path = sqlite_path(loaded.db_url)
    if path is not None and path.exists():
        from orchestrator.store.sqlite_writer import SqliteRunStore

        history = SqliteRunStore(path)
        if history.usable:
            with _marked(history, loaded) as marked:
                yield marked
            return
        history.close()
    with open_store(loaded) as store:
        yield store


@contextmanager
def _marked(store: H, loaded: Loaded) -> Iterator[H]:
    """`store`, with the pipeline's dead runs marked interrupted first; closed on exit (which also stops the
    heartbeat of a run leased on it)."""
    try:
        store.mark_dead_runs(loaded.pipeline.display_name)
        yield store
    finally:
        store.close()


@contextmanager
def _whole_store(loaded: Loaded, history: RunHistory) -> Iterator[Store]:
    """The Store behind a run's history, for what only Store answers (serving, after a run)."""
    from orchestrator.store.store import Store

    if isinstance(history, Store):
        yield history
        return
    with open_store(loaded) as store:
        yield store


@contextmanager
def read_store(loaded: Loaded) -> Iterator[Store]:
    """The history to read (status, runs, show, logs, metrics, schedule): opened as it is, never created,
    migrated or marked; a run whose owner is provably gone reads as interrupted all the same."""
    from orchestrator.store.store import Store

    store = Store(loaded.db_url, read_only=True)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def status_history(loaded: Loaded) -> Iterator[HistoryReads]:
    """What `pipe status` and a dry run read, as read_store gives it; on a SQLite file read with the standard
    library (store/sqlite_reader.py), so neither imports SQLAlchemy (issue 20)."""
    from orchestrator.store.sqlite_reader import SqliteHistory, sqlite_path

    path = sqlite_path(loaded.db_url)
    if path is None:
        with read_store(loaded) as store:
            yield store
        return
    with SqliteHistory(path) as history:
        yield history


def validate(target: Target, check_images: bool = True, docker_url: str | None = None,
             reporter: Reporter | None = None) -> Pipeline:
    """Load and check a file (and, with the engine, its GPUs and that its images exist or build, reporting
    builds) without running any stage."""
    loaded = load(target)
    build_plan(loaded.pipeline)
    loader.resolve_secrets(loaded.pipeline, os.environ)
    if check_images:
        from orchestrator.backend import DockerBackend

        backend = DockerBackend(docker_url)
        check_gpus(loaded.pipeline, loaded.pipeline.stages, backend)
        backend.resolve_images(loaded.pipeline, loaded.pipeline.stages, loaded.state.ensure().images_memo,
                               (reporter or NullReporter()).emit, None)
    return loaded.pipeline


@dataclass(frozen=True)
class Validation:
    """`pipe validate --json`: the pipeline when it is valid, else every error found (file order)."""

    pipeline: Pipeline | None
    errors: list[Any]  # PipeError; SpecError ones carry file, line and key


def validate_all(target: Target, check_images: bool = True, docker_url: str | None = None) -> Validation:
    """validate, reporting every error in the document's shape instead of raising the first."""
    from orchestrator.errors import PipeError

    try:
        _, errors = loader.check_pipeline(target.pipeline_path)
        if errors:
            return Validation(None, list(errors))
        return Validation(validate(target, check_images, docker_url), [])
    except PipeError as e:
        return Validation(None, [e])


def check_gpus(pipeline: Pipeline, stages: Iterable[str], backend: Backend) -> None:
    """SpecError on the first stage asking for GPUs when the engine cannot give any: before any stage starts,
    in one line, instead of the engine's raw refusal (exit 4) once the run is under way."""
    wanting = [name for name in stages if pipeline.stages[name].resources.gpus > 0]
    if wanting and (problem := backend.gpu_problem()):
        name = wanting[0]
        count = pipeline.stages[name].resources.gpus
        raise pipeline.error(f"stages.{name}.resources.gpus", f"asks for {count} GPU{'s' * (count != 1)} but {problem}")


@dataclass(frozen=True)
class Prepared:
    """A run's inputs, checked: the pipeline with its overrides, the plan, the secrets. Nothing started yet."""

    loaded: Loaded
    pipeline: Pipeline
    overrides: dict[str, Any]
    plan: Plan
    secrets: dict[str, str]
    force: frozenset[str]


def prepare(request: RunRequest) -> Prepared:
    loaded = load(request.target)
    overrides = parse_overrides(request.params)
    pipeline = apply_overrides(loaded.pipeline, overrides)
    plan = build_plan(pipeline, request.selection)
    secrets = loader.resolve_secrets(pipeline, os.environ)
    force = frozenset(plan.order) if request.force is True else frozenset(request.force or ())
    return Prepared(loaded, pipeline, overrides, plan, secrets, force)


@dataclass(frozen=True)
class Forecast:
    """What a run would do, stage by stage (a dry run, or the "next run" of `pipe status`)."""

    pipeline: Pipeline
    decisions: list[Decision]

    @property
    def would_run(self) -> list[str]:
        return [d.stage for d in self.decisions if d.run]


class _StoreHistory:
    """decide.History over the store: every stage's history read in one query (Store.stage_histories) when a
    decision first asks, not one query per stage; a forecast whose stages are all cache hits asks nothing.
    `exclude_run`: the run being recorded, whose own records (a failed attempt) are not its stages' history.
    Thread-safe: a run's stages decide from parallel's threads."""

    def __init__(self, store: HistoryReads, pipeline: str, exclude_run: str | None = None) -> None:
        self._store, self._pipeline, self._exclude = store, pipeline, exclude_run
        self._histories: dict[str, StageHistory] | None = None
        self._lock = threading.Lock()

    def _of(self, stage: str) -> StageHistory | None:
        with self._lock:
            if self._histories is None:
                self._histories = self._store.stage_histories(self._pipeline, exclude_run=self._exclude)
            return self._histories.get(stage)

    def last_success(self, stage: str) -> StageRunInfo | None:
        history = self._of(stage)
        return history.last_success if history else None

    def last_record(self, stage: str) -> StageRunInfo | None:
        history = self._of(stage)
        return history.last_record if history else None


def _forecast(pipeline: Pipeline, order: tuple[str, ...], store: HistoryReads, state: StateDir,
              images: Mapping[str, ImageForecast], upstream: Mapping[str, Upstream],
              force: frozenset[str], cache: CacheStore | None = None) -> Forecast:
    """decide() for every stage as a dry run. The cache store, by default the one `remote:` asks for (local,
    or local then remote), reads only: a remote hit is reported as "cached (remote)", nothing downloaded."""
    from orchestrator import sharing
    from orchestrator.decide import forecast
    from orchestrator.runner import hash_inputs

    inputs = hash_inputs(pipeline, order, store.hash_memo())
    decisions = forecast(pipeline, order, images={n: (f.image_id, f.reason) for n, f in images.items()},
                         inputs=inputs, upstream={n: u.digest for n, u in upstream.items()}, force=force,
                         cache=cache or sharing.cache_store(pipeline, state, fetch=False),
                         history=_StoreHistory(store, pipeline.display_name))
    return Forecast(pipeline, decisions)


def dry_run(request: RunRequest, backend: Backend | None = None) -> Forecast:
    """Which stages a run would restore and which it would run, and why; starts, builds and writes nothing."""
    from orchestrator.backend import backend_for

    prepared = prepare(request)
    backend = backend or backend_for(prepared.pipeline, request.docker_url, request.executor, request.kube_context)
    pipeline, order = prepared.pipeline, prepared.plan.order
    with status_history(prepared.loaded) as store:
        upstream = _earlier_outputs(prepared.plan, pipeline, store)
        images = backend.forecast_images(pipeline, order, prepared.loaded.state.images_memo, store.hash_memo())
        return _forecast(pipeline, order, store, prepared.loaded.state, images, upstream, prepared.force)


def run_pipeline(request: RunRequest, reporter: Reporter, cancel: Cancel | None = None,
                 backend: Backend | None = None) -> RunSummary:
    """prepare -> lock -> recover -> images -> hash inputs -> execute -> record (docs/architecture.md)."""
    from orchestrator import sharing
    from orchestrator.backend import backend_for
    from orchestrator.cache import Cache
    from orchestrator.hashing import hash_tree
    from orchestrator.recorder import Recorder
    from orchestrator.runner import StageRunner, hash_inputs

    cancel = cancel or Cancel()
    prepared = prepare(request)
    backend = backend or backend_for(prepared.pipeline, request.docker_url, request.executor, request.kube_context)
    check_gpus(prepared.pipeline, prepared.plan.order, backend)
    pipeline, order, state = prepared.pipeline, prepared.plan.order, prepared.loaded.state.ensure()
    caches = sharing.cache_store(pipeline, state, fetch=not backend.stores_outputs)
    fetched = fetched_stages(request.fetch, pipeline, order)
    sharing.check_remote(pipeline, caches, reporter)
    with state.lock(wait=request.wait) as lock, open_run_history(prepared.loaded) as store:
        backend.sweep(str(state.root), is_alive=store.run_alive)
        upstream = _earlier_outputs(prepared.plan, pipeline, store)
        memo = store.hash_memo()
        image_ids = backend.resolve_images(pipeline, order, state.images_memo, reporter.emit, memo)
        input_digests = hash_inputs(pipeline, order, memo)
        run_id = _begin_run(store, prepared, request)
        store.lease(run_id)  # renewed until finish_run, or until open_store closes the store
        lock.describe(run_id)
        reporter.emit(RunStarted(run_id, pipeline.display_name, order))
        recorder = Recorder(store, run_id, pipeline, state, reporter)
        executor = backend.executor()
        run_stage = StageRunner(
            pipeline=pipeline, run_id=run_id, state=state, cache=caches, executor=executor,
            reporter=recorder, history=_StoreHistory(store, pipeline.display_name, exclude_run=run_id),
            gate_baseline=lambda stage, metric: store.gate_baseline(pipeline.display_name, stage, metric),
            image_ids=image_ids, input_digests=input_digests,
            rehash=lambda rel: hash_tree(pipeline.root / rel, memo).digest,
            upstream=upstream, secrets=prepared.secrets, force=prepared.force, gate=request.gate,
            stored=caches if backend.stores_outputs and not isinstance(caches, Cache) else None,
            fetch=fetched.__contains__,
        )
        try:
            report = _execute(prepared, request, run_stage, recorder, cancel, executor.stop_all, backend.capacity())
        except BaseException:
            with suppress(StoreError):  # the stages restored before the failure stay in history
                recorder.flush()
            raise
        summary = summarize(run_id, report.results, cancel if report.cancelled else None)
        recorder.flush()
        store.finish_run(run_id, summary.status, summary.exit_code)
        sharing.auto_push(pipeline, caches, summary, order, reporter)
        if pipeline.serve is not None or pipeline.notify:  # issue 18: notify, auto-promote; never raises
            from orchestrator.serve_api import after_run, settled
            lines: list[str] = []
            if not settled(pipeline, summary, store):
                with _whole_store(prepared.loaded, store) as whole:
                    lines = after_run(prepared.loaded, whole, summary, request.docker_url,
                                      prepared.secrets.values())
            for line in lines:
                reporter.emit(Notice(line))
        reporter.emit(RunFinished(summary))
        return summary


def fetched_stages(fetch: str, pipeline: Pipeline, order: tuple[str, ...]) -> frozenset[str]:
    """The stages whose outputs a cluster run brings to this host: `all`, `none`, or `final`, the stages of the
    run that no other stage of it needs (its leaves)."""
    if fetch == "all":
        return frozenset(order)
    if fetch == "none":
        return frozenset()
    needed = {up for name in order for up in pipeline.stages[name].needs}
    return frozenset(name for name in order if name not in needed)


def _begin_run(store: RunHistory, prepared: Prepared, request: RunRequest) -> str:
    pipeline = prepared.pipeline
    commit, dirty = _git_state(pipeline.root)
    return store.begin_run(
        pipeline=pipeline.display_name,
        pipeline_path=str(pipeline.path.resolve()),
        pipeline_hash=hashlib.sha256(pipeline.path.read_bytes()).hexdigest(),
        trigger=request.trigger,
        git_commit=commit,
        git_dirty=dirty,
        host=socket.gethostname(),
        pid=os.getpid(),
        params_override=prepared.overrides,
    )


def _execute(prepared: Prepared, request: RunRequest, run_stage: StageRunner, reporter: Reporter,
             cancel: Cancel, on_cancel: Callable[[], None], capacity: tuple[float, int]) -> Execution:
    from orchestrator import parallel

    pipeline, order = prepared.pipeline, prepared.plan.order
    cpus, memory = capacity
    return parallel.execute(
        order,
        {name: pipeline.stages[name].needs for name in order},
        run_stage,
        policy=parallel.Policy(
            jobs=request.jobs or max(1, int(cpus)), keep_going=request.keep_going, deadline_s=request.timeout_s
        ),
        capacity=parallel.Capacity(cpus, memory),
        demands={name: _demand(pipeline, name) for name in order},
        retry={
            name: parallel.RetryPolicy(s.retries, s.retry_delay, frozenset(s.retry_on))
            for name, s in ((n, pipeline.stages[n]) for n in order)
        },
        cancel=cancel.event,
        reporter=reporter,
        on_cancel=on_cancel,
        fatal=(StoreError,),
    )


def _demand(pipeline: Pipeline, name: str) -> Demand:
    from orchestrator.parallel import Demand

    res = pipeline.resources_of(name)
    return Demand(res.cpus or 0.0, res.memory or 0)


def summarize(run_id: str, results: dict[str, StageResult], cancel: Cancel | None) -> RunSummary:
    """The run's status and exit code: the most severe outcome across its stages."""
    if cancel is not None:
        return RunSummary(run_id, RunStatus.CANCELLED, results, cancel.exit_code)
    if any(r.infra_error for r in results.values()):
        return RunSummary(run_id, RunStatus.FAILED, results, ExitCode.INFRA)
    if all(r.ok for r in results.values()):
        return RunSummary(run_id, RunStatus.SUCCEEDED, results, ExitCode.SUCCESS)
    return RunSummary(run_id, RunStatus.FAILED, results, ExitCode.FAILED)


def _earlier_outputs(plan: Plan, pipeline: Pipeline, store: HistoryReads) -> dict[str, Upstream]:
    """For `--stage`/`--from`: outputs of upstream stages that this run does not execute, from earlier runs."""
    from orchestrator.runner import Upstream

    selected = set(plan.order)
    found: dict[str, Upstream] = {}
    history = _StoreHistory(store, pipeline.display_name)
    for name in plan.order:
        for up in pipeline.stages[name].needs:
            if up in selected or up in found:
                continue
            last = history.last_success(up)
            if last is not None and last.outputs_path and last.outputs_digest and not Path(last.outputs_path).is_dir():
                run = Path(last.outputs_path).parent.name  # runs/<run id>/<stage>
                raise UsageError(f"stage {name} needs the outputs of {up} from run {run}, which are not on this "
                                 f"host (left in the remote, or pruned): `pipe pull {run} --stage {up}` brings them")
            if last is None or not last.outputs_path or not last.outputs_digest:
                raise UsageError(
                    f"stage {name} needs the outputs of {up} from an earlier run, but there are none; "
                    f"run `pipe run --from {up}` first"
                )
            found[up] = Upstream(Path(last.outputs_path), last.outputs_digest)
    return found


def _git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the tree has uncommitted changes) of the git tree holding `folder`; None when it is
    not in one or git is absent."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    if commit is None:
        return None, None
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit, None if changes is None else bool(changes.strip())


# ---- history --------------------------------------------------------------------------------------------------


def list_runs(target: Target, status: str | None, trigger: str | None, limit: int) -> list[RunInfo]:
    loaded = load(target)
    with read_store(loaded) as store:
        return store.list_runs(
            loaded.pipeline.display_name, status=_run_status(status), trigger=parse_trigger(trigger), limit=limit,
            with_stages=True,
        )


def _run_status(value: str | None) -> RunStatus | None:
    if value is None:
        return None
    try:
        return RunStatus(value)
    except ValueError:
        raise UsageError(f"unknown status {value!r}: use {', '.join(s.value for s in RunStatus)}") from None


def parse_executor(value: str | None) -> Literal["local", "swarm", "kubernetes"] | None:
    if value not in (None, "local", "swarm", "kubernetes"):
        raise UsageError(f"unknown executor {value!r}: use local, swarm or kubernetes")
    return value  # type: ignore[return-value]


def parse_fetch(value: str) -> Literal["none", "final", "all"]:
    if value not in ("none", "final", "all"):
        raise UsageError(f"unknown --fetch {value!r}: use none, final or all")
    return value  # type: ignore[return-value]


def parse_trigger(value: str | None) -> Literal["manual", "schedule"] | None:
    if value not in (None, "manual", "schedule"):
        raise UsageError(f"unknown trigger {value!r}: use manual or schedule")
    return value  # type: ignore[return-value]


def show_run(target: Target, run: str) -> RunInfo:
    loaded = load(target)
    with read_store(loaded) as store:
        return store.get_run(run, loaded.pipeline.display_name)


@dataclass(frozen=True)
class StageLog:
    """Where a stage's log is: `run` is the run asked for; `stage` (and `origin`, with --origin) say whose log
    `path` is: a cached stage's log is that of the run whose outputs it restored."""

    run: RunInfo
    stage: StageRunInfo
    path: Path
    origin: str | None = None


def log_path(target: Target, run: str, stage: str, origin: bool = False) -> StageLog:
    """The log of `stage` in `run`; with `origin`, a cached stage's log in the run it was restored from. NotFound
    names the closest stage for a typo, and for a cached stage the run to look at."""
    import difflib

    from orchestrator.errors import NotFound

    loaded = load(target)
    with read_store(loaded) as store:
        info = store.get_run(run, loaded.pipeline.display_name)
        found = {s.stage: s for s in info.stages}
        if stage not in found:
            names = sorted(set(found) | set(loaded.pipeline.stages))
            close = difflib.get_close_matches(stage, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; its stages: {', '.join(sorted(found)) or 'none'}"
            raise NotFound(f"run {info.id} has no stage {stage!r}{hint}")
        this = found[stage]
        if this.status is StageStatus.CACHED and this.cached_from:
            if not origin:
                raise NotFound(
                    f"stage {stage} of run {info.id} was cached: its outputs were restored from run "
                    f"{this.cached_from}; `pipe logs {info.id} {stage} --origin` shows that run's log"
                )
            source = store.get_run(this.cached_from, loaded.pipeline.display_name)
            ran = next((s for s in source.stages if s.stage == stage and s.log_path), None)
            if ran is None:
                raise NotFound(f"run {source.id}, which stage {stage} was restored from, has no log for it")
            return StageLog(info, ran, Path(ran.log_path or ""), source.id)
    if not this.log_path:
        why = f": {this.reason}" if this.reason else ""
        raise NotFound(f"stage {stage} of run {info.id} has no log (it never started{why})")
    if not Path(this.log_path).exists() and (at := pruned_at(target, info.id)) is not None:
        raise NotFound(f"run {info.id}: outputs pruned by gc on {at.astimezone():%Y-%m-%d %H:%M}")
    return StageLog(info, this, Path(this.log_path))


def follow_log(target: Target, log: StageLog, poll_s: float = 0.3, logs: LogStore | None = None
               ) -> Iterator[bytes]:
    """The lines of `log` (bytes, each with its newline but maybe the last), then, while its stage still runs,
    each line it gains (`pipe logs -f`), read through a LogStore (this host's files by default). Opens the
    store once. NotFound when there is no log to read."""
    import time

    from orchestrator.errors import NotFound
    from orchestrator.logstore import LocalLogStore

    logs = logs or LocalLogStore()
    ref = str(log.path)
    loaded = load(target)
    run_id = log.origin or log.run.id
    with read_store(loaded) as store:

        def running() -> bool:
            return _stage_running(store.get_run(run_id, loaded.pipeline.display_name), log.stage.stage)

        while logs.read(ref, 0, 0) is None and running():
            time.sleep(poll_s)  # started, but its container has not written the log yet
        if logs.read(ref, 0, 0) is None:
            raise NotFound(f"stage {log.stage.stage} of run {run_id} has no log file at {log.path}")
        partial, offset = b"", 0
        while True:
            chunk = logs.read(ref, offset) or b""
            offset += len(chunk)
            if chunk:
                *lines, partial = (partial + chunk).split(b"\n")
                yield from (line + b"\n" for line in lines)
            elif running():
                time.sleep(poll_s)
            else:
                rest = partial
                while more := logs.read(ref, offset) or b"":  # what it wrote between the last read and its end
                    rest, offset = rest + more, offset + len(more)
                yield from (line + b"\n" for line in rest.split(b"\n")[:-1])
                if rest and not rest.endswith(b"\n"):
                    yield rest.rsplit(b"\n", 1)[-1]
                return


def metric_history(target: Target, limit: int) -> list[MetricPoint]:
    loaded = load(target)
    with read_store(loaded) as store:
        return store.metric_history(loaded.pipeline.display_name, limit)


def dag_plan(target: Target) -> Plan:
    """The whole stage graph, for `pipe dag --json`."""
    return build_plan(load(target).pipeline)


def dag(target: Target, fmt: str) -> str:
    from orchestrator import plan as plan_mod

    plan = build_plan(load(target).pipeline)
    render = {"text": plan_mod.to_text, "mermaid": plan_mod.to_mermaid, "dot": plan_mod.to_dot}.get(fmt)
    if render is None:
        raise UsageError(f"unknown format {fmt!r}: use text, mermaid or dot")
    return render(plan)


def schema() -> dict[str, Any]:
    from orchestrator.spec import json_schema

    return json_schema()


@dataclass(frozen=True)
class StatusReport:
    pipeline: Pipeline
    run: RunInfo | None
    next_run: list[Decision]  # in plan order
    disk: DiskUse | None = None  # of the state dir


def status(target: Target, backend: Backend | None = None) -> StatusReport:
    """The latest run and what would run next time and why: the same forecast as `pipe run --dry-run`. Images
    are checked with the engine's read-only view when it answers; without one, from what the last resolution
    recorded (base images are then assumed unchanged)."""
    loaded = load(target)
    with status_history(loaded) as store:
        run = store.latest_run(loaded.pipeline.display_name)
        decisions = _next_run(loaded, store, backend)
    from orchestrator.prune import disk_use

    return StatusReport(loaded.pipeline, run, decisions, disk_use(loaded.state))


def next_run(target: Target, backend: Backend | None = None, cache: CacheStore | None = None) -> list[Decision]:
    """What the next whole run would do (`pipe status`'s "next run"), for `pipe pull`."""
    loaded = load(target)
    with read_store(loaded) as store:
        return _next_run(loaded, store, backend, cache)


def _next_run(loaded: Loaded, store: HistoryReads, backend: Backend | None, cache: CacheStore | None = None
              ) -> list[Decision]:
    from orchestrator.backend import DockerBackend
    from orchestrator.errors import EngineError
    from orchestrator.imageplan import ImageMemo, RecordedView, forecast

    pipeline = loaded.pipeline
    plan = build_plan(pipeline)
    hash_memo = store.hash_memo()
    try:
        images = (backend or DockerBackend()).forecast_images(pipeline, plan.order, loaded.state.images_memo,
                                                              hash_memo)
    except EngineError:
        if backend is not None:
            raise
        memo = ImageMemo.load(loaded.state.images_memo)  # no engine: base images as the last resolution saw them
        images = forecast(pipeline, plan.order, memo, RecordedView(memo), hash_memo)
    return _forecast(pipeline, plan.order, store, loaded.state, images, {}, frozenset(), cache).decisions


def stage_running(target: Target, run_id: str, stage: str) -> bool:
    return _stage_running(show_run(target, run_id), stage)


def _stage_running(info: RunInfo, stage: str) -> bool:
    return info.status == RunStatus.RUNNING and any(s.stage == stage and s.status is None for s in info.stages)


# ---- gates ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedGate:
    stage: str
    metric: str
    value: float
    run_id: str


def gate_accept(target: Target, run: str, stage: str | None = None) -> list[AcceptedGate]:
    """Make RUN's metrics the baseline every gate (or the one of `stage`) measures max_drop from; recorded."""
    import difflib

    loaded = load(target)
    pipeline = loaded.pipeline
    gated = {name: s.gate for name, s in pipeline.stages.items() if s.gate is not None}
    if stage is not None and stage not in gated:
        close = difflib.get_close_matches(stage, sorted(gated), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"stage {stage!r} has no gate{hint}; gated stages: {', '.join(sorted(gated)) or 'none'}")
    accepted = []
    with open_store(loaded) as store:
        info = store.get_run(run, pipeline.display_name)
        for name, gate in sorted(gated.items()):
            if stage is not None and name != stage:
                continue
            record = info.stage(name)
            value = record.metrics.get(gate.metric) if record is not None else None
            if value is None:
                raise UsageError(f"run {info.id} recorded no {gate.metric} for stage {name}: nothing to accept")
            store.accept_gate(pipeline.display_name, name, gate.metric, info.id, value)
            accepted.append(AcceptedGate(name, gate.metric, value, info.id))
    return accepted


# ---- cache ------------------------------------------------------------------------------------------------------


def cache_entries(target: Target) -> list[Manifest]:
    from orchestrator.cache import Cache

    return sorted(Cache(load(target).state.cache_dir).entries(), key=lambda m: m.created_at, reverse=True)


def cache_disk_use(target: Target) -> DiskUse:
    """prune.DiskUse of the state dir: the cache, and what the run folders add to it."""
    from orchestrator import prune

    return prune.disk_use(load(target).state)


def cache_verify(target: Target, repair: bool = False) -> VerifyReport:
    """cache.VerifyReport: every blob re-hashed; with `repair`, corrupt blobs and the entries needing them go.
    Under the lock when repairing (a run saving meanwhile could lose a blob it just stored)."""
    from orchestrator.cache import Cache

    loaded = load(target)
    cache = Cache(loaded.state.cache_dir)
    if not repair:
        return cache.verify()
    with loaded.state.lock():
        return cache.verify(repair=True)


def cache_gc(target: Target, keep_runs: int | None, keep_days: float | None, dry_run: bool) -> GcReport:
    """`pipe cache gc`: `gc` of the cache alone; run folders stay, so blobs they link stay on disk."""
    return gc(target, keep_runs, keep_days, dry_run, runs=False, images=False).cache


@dataclass(frozen=True)
class GcResult:
    dry_run: bool
    runs_removed: tuple[str, ...]
    runs_kept: tuple[str, ...]
    cache: GcReport
    bytes_freed: int  # run folders and cache files together, each block once when its last link goes
    images_removed: tuple[str, ...] = ()
    images_held: tuple[str, ...] = ()  # pipe built them and nothing kept uses them, but a container does
    runs_held: tuple[tuple[str, str], ...] = ()  # (run id, why): kept only because serving needs them
    image_bytes_freed: int = 0
    warnings: tuple[str, ...] = ()


def gc(target: Target, keep_runs: int | None, keep_days: float | None, dry_run: bool, runs: bool = True,
       images: bool = True, docker_url: str | None = None) -> GcResult:
    """`pipe gc`: removes the folders of the runs the policy does not keep (prune.plan_runs; never the latest
    successful run nor a running one, nor the served model or the run rollback goes back to), the cache entries
    no kept run uses, and the images pipe built that no kept run, kept entry or `image:` stage uses. Holds the
    pipeline's lock throughout."""
    from orchestrator import prune
    from orchestrator.cache import Cache
    from orchestrator.fsops import Freed

    if keep_runs is None and keep_days is None:
        raise UsageError("say what to keep: --keep-runs N and/or --keep-days D")
    loaded = load(target)
    state, now = loaded.state, datetime.now(UTC)
    with open_store(loaded) as store, state.lock():
        plan = _kept_runs(loaded, store, keep_runs, keep_days, now)
        keys = kept_keys(loaded, store, keep_runs, keep_days, now, plan)
        freed = Freed()
        removed = plan.remove if runs else ()
        prune.remove_runs(state, removed, freed, dry_run)
        if removed and not dry_run:
            prune.record_pruned(state, (r.id for r in removed), now)
        cache = Cache(state.cache_dir)
        report = cache.gc(keys, dry_run=dry_run, freed=freed)
        result = GcResult(dry_run, tuple(r.id for r in removed), tuple(r.id for r in plan.keep), report,
                          freed.bytes, runs_held=plan.held)
        if images:
            used = {s.image_id for r in plan.keep for s in r.stages if s.image_id}
            used |= {m.ingredients.image for m in cache.entries() if m.key in keys}
            result = _gc_images(loaded, used, dry_run, docker_url, result)
    return result


def _kept_runs(loaded: Loaded, store: Store, keep_runs: int | None, keep_days: float | None, now: datetime
               ) -> Any:
    from orchestrator import prune

    history = store.list_runs(loaded.pipeline.display_name, limit=2**31 - 1, with_stages=True)
    return prune.plan_runs(history, prune.KeepPolicy(keep_runs, keep_days), now,
                           lambda run_id: loaded.state.run_dir(run_id).is_dir(), _served(loaded, store))


def _served(loaded: Loaded, store: Store) -> dict[str, str]:
    """The runs serving needs (serving.held_runs): gc never removes the served model nor the rollback target."""
    from orchestrator import serve_proxy
    from orchestrator.serving import held_runs

    events = store.serve_events(loaded.pipeline.display_name, limit=None)
    routing = serve_proxy.read(loaded.state.serve_dir / "proxy")
    return held_runs(events, routing) if events or routing.run_id else {}


def kept_keys(loaded: Loaded, store: Store, keep_runs: int | None, keep_days: float | None, now: datetime,
              plan: Any = None) -> set[str]:
    """The cache keys gc keeps: those of the runs the policy keeps, and those other pipelines' kept runs use."""
    plan = plan if plan is not None else _kept_runs(loaded, store, keep_runs, keep_days, now)
    keys = {s.cache_key for r in plan.keep for s in r.stages if s.cache_key}
    return keys | store.referenced_cache_keys(keep_runs=keep_runs, keep_days=keep_days)


def _gc_images(loaded: Loaded, used: set[str], dry_run: bool, docker_url: str | None, result: GcResult) -> GcResult:
    from orchestrator import docker_executor, images
    from orchestrator.errors import EngineError

    memo = loaded.state.images_memo
    if not memo.exists():
        return result  # pipe built nothing here: no engine needed
    refs = [s.image for s in loaded.pipeline.stages.values() if s.image is not None]
    try:
        client = docker_executor.connect(docker_url)
        removed, held, freed = images.remove_unused_built_images(client, memo, used, refs, dry_run)
    except EngineError as e:
        return replace(result, warnings=(*result.warnings, f"images not collected: {e}"))
    return replace(result, images_removed=tuple(removed), images_held=tuple(held), image_bytes_freed=freed)


def pruned_at(target: Target, run_id: str) -> datetime | None:
    """When `pipe gc` removed this run's folder (outputs and logs), or None."""
    from orchestrator import prune

    return prune.pruned_at(load(target).state, run_id)


# ---- schedules ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleReport:
    pipeline: Pipeline
    schedule: Schedule
    next_times: list[datetime]  # UTC
    ticks: list[TickInfo]  # what the scheduler did with its latest ticks, newest first


def schedule_report(target: Target, count: int) -> ScheduleReport:
    """The next `count` fire times of the pipeline's schedule, and its `count` latest ticks from history."""
    from orchestrator import cron

    loaded = load(target)
    pipeline = loaded.pipeline
    if pipeline.schedule is None:
        raise UsageError(f"{pipeline.path} has no `schedule:`; add one (cron:, timezone:)")
    with read_store(loaded) as store:
        ticks = store.ticks(pipeline.display_name, count)
    schedule = pipeline.schedule
    return ScheduleReport(pipeline, schedule, cron.next_fire_times(schedule, datetime.now(UTC), count), ticks)


def crontab_entry(target: Target) -> CrontabEntry:
    """The crontab entry for the pipeline's schedule, with absolute paths and the environment it needs."""
    import shutil
    import sys

    from orchestrator import cron, crontab

    loaded = load(target)
    pipeline = loaded.pipeline
    if pipeline.schedule is None:
        raise UsageError(f"{pipeline.path} has no `schedule:`; add one (cron:, timezone:)")
    executable = shutil.which("pipe") or str(Path(sys.argv[0]).resolve())
    executable = str(Path(executable).resolve())
    env = {"PATH": f"{Path(executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    if target.state_dir is not None:
        env["PIPE_STATE_DIR"] = str(loaded.state.root)
    if target.db_url is not None:
        env["PIPE_DB"] = target.db_url
    return cron.crontab_line(
        pipeline.path.resolve(), pipeline.schedule, executable, env,
        state_dir=loaded.state.root, system_timezone=crontab.system_timezone(),
    )


def install_schedule(target: Target, apply: bool, force: bool = False) -> CrontabEntry:
    """The crontab entry; written into the user's crontab only with `apply`. Cron would read the fields in
    another time zone than the schedule's (entry.warning; Debian's cron ignores CRON_TZ): UsageError unless
    `force`, before the crontab is touched."""
    from orchestrator import crontab

    entry = crontab_entry(target)
    if apply and entry.warning and not force:
        raise UsageError(f"not installed: {entry.warning}; --force installs it anyway")
    if apply:
        crontab.install_crontab(entry, apply=True)
    return entry


def uninstall_schedule(target: Target) -> int:
    from orchestrator import cron, crontab

    return crontab.uninstall_crontab(cron.crontab_marker(load(target).pipeline.path.resolve()))


def run_scheduler(
    paths: list[Path], target: Target, reporter: Reporter, stop: threading.Event,
    on_stop: Literal["finish", "cancel"] = "finish", clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    wait: Callable[[float], object] | None = None,
) -> None:
    """`pipe scheduler`: fire scheduled runs of these pipelines until `stop` is set. Each pipeline keeps its own
    state dir and history; ticks are recorded there."""
    from orchestrator.scheduler import RunOutcome, Scheduler

    by_name: dict[str, Target] = {}

    def load_one(path: Path) -> Pipeline:
        pipeline = loader.load_pipeline(path)
        by_name[pipeline.display_name] = Target(path, target.state_dir, target.db_url)
        return pipeline

    def run(path: Path, trigger: str, cancel: threading.Event) -> RunOutcome:
        request = RunRequest(target=Target(path, target.state_dir, target.db_url), trigger="schedule")
        summary = run_pipeline(request, reporter, Cancel(event=cancel))
        return RunOutcome(summary.run_id, int(summary.exit_code))

    def record_tick(name: str, due_at: datetime, action: TickAction, reason: str, run_id: str | None) -> None:
        with open_store(load(by_name[name])) as store:
            store.record_tick(name, due_at, action, reason, run_id)

    def last_tick(name: str) -> datetime | None:
        with read_store(load(by_name[name])) as store:
            ticks = store.ticks(name, 1)
        return ticks[0].due_at if ticks else None

    Scheduler(
        paths, load=load_one, run=run, record_tick=record_tick, last_tick=last_tick,
        clock=clock, stop=stop, on_stop=on_stop, wait=wait,
    ).run_forever()
