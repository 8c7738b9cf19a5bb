"""The use cases behind the commands; the only module that wires the real parts together.

Each function takes plain arguments and returns plain values (results, records, strings); console.py renders
them. Run: load → plan → lock → recover → images → hash inputs → execute → record (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orchestrator import loader
from orchestrator.errors import ExitCode, StoreError, UsageError
from orchestrator.events import NullReporter, Reporter, RunFinished, RunStarted, StagePlanned
from orchestrator.plan import Plan, Selection, build_plan
from orchestrator.results import RunStatus, RunSummary, StageResult, StageStatus
from orchestrator.spec import Pipeline
from orchestrator.state import StateDir
from orchestrator.store.records import MetricPoint, RunInfo, StageRunInfo, TickInfo
from orchestrator.units import format_duration

if TYPE_CHECKING:  # SQLAlchemy is imported by the commands that open the store, not by `pipe --help`
    from orchestrator.store.store import Store


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
    dry_run: bool = False
    wait: bool = False
    timeout_s: float | None = None
    params: tuple[str, ...] = ()  # "train.n_estimators=300"
    trigger: Literal["manual", "schedule"] = "manual"
    docker_url: str | None = None


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
    from orchestrator.store.store import Store

    loaded.state.ensure()
    store = Store(loaded.db_url)
    try:
        if not loaded.state.is_locked():  # nobody runs: a "running" run is a dead one
            for run in store.running_runs(loaded.pipeline.display_name):
                store.mark_interrupted(run.id)
        yield store
    finally:
        store.close()


def parse_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    """`-p train.n_estimators=300` -> {"train.n_estimators": 300}: JSON values when they parse, else strings."""
    parsed: dict[str, Any] = {}
    for item in items:
        dotted, sep, raw = item.partition("=")
        if not sep or "." not in dotted.strip("."):
            raise UsageError(f"bad param override {item!r}: use STAGE.KEY=VALUE, e.g. train.n_estimators=300")
        try:
            parsed[dotted] = json.loads(raw)
        except ValueError:
            parsed[dotted] = raw
    return parsed


def apply_overrides(pipeline: Pipeline, overrides: dict[str, Any]) -> Pipeline:
    """The pipeline with params overridden for one run; nested keys by dots (train.model.depth=3)."""
    if not overrides:
        return pipeline
    stages = dict(pipeline.stages)
    for dotted, value in overrides.items():
        name, _, key = dotted.partition(".")
        if name not in stages:
            raise UsageError(f"param override {dotted}: unknown stage {name!r}")
        params = json.loads(json.dumps(stages[name].params))  # deep copy
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"param override {dotted}: {part} is not a mapping")
        node[leaf] = value
        stages[name] = stages[name].model_copy(update={"params": params})
    return pipeline.model_copy(update={"stages": stages}).with_source(pipeline.source)


def validate(target: Target, check_images: bool = True, docker_url: str | None = None,
             reporter: Reporter | None = None) -> Pipeline:
    """Load and check a file (and that its images exist or build, reporting builds) without running any stage."""
    loaded = load(target)
    build_plan(loaded.pipeline)
    loader.resolve_secrets(loaded.pipeline, os.environ)
    if check_images:
        from orchestrator import docker_executor, images

        client = docker_executor.connect(docker_url)
        images.resolve_images(
            loaded.pipeline, loaded.pipeline.stages, client, loaded.state.ensure().images_memo,
            reporter_build(reporter or NullReporter()),
        )
    return loaded.pipeline


def run_pipeline(request: RunRequest, reporter: Reporter, cancel: Cancel | None = None) -> RunSummary:
    from orchestrator import docker_executor, images, parallel
    from orchestrator.cache import Cache
    from orchestrator.runner import StageRunner, container_user, hash_inputs, predict

    cancel = cancel or Cancel()
    loaded = load(request.target)
    overrides = parse_overrides(request.params)
    pipeline = apply_overrides(loaded.pipeline, overrides)
    plan = build_plan(pipeline, request.selection)
    secrets = loader.resolve_secrets(pipeline, os.environ)
    client = docker_executor.connect(request.docker_url)
    state = loaded.state.ensure()
    with state.lock(wait=request.wait) as lock, open_store(loaded) as store:
        docker_executor.sweep_orphans(client, str(state.root), is_alive=lambda run_id: False)
        upstream = _earlier_outputs(plan, pipeline, store)
        image_ids = images.resolve_images(pipeline, plan.order, client, state.images_memo, reporter_build(reporter))
        input_digests = hash_inputs(pipeline, plan.order, store.hash_memo())
        force = frozenset(plan.order) if request.force is True else frozenset(request.force or ())
        cache = Cache(state.cache_dir)
        if request.dry_run:
            predictions = predict(pipeline, plan.order, store, cache, image_ids, input_digests, upstream, force)
            for p in predictions:
                reporter.emit(StagePlanned(p.stage, p.will_run, p.reasons))
            return _predicted_summary(predictions)
        run_id = store.begin_run(
            pipeline=pipeline.display_name,
            pipeline_path=str(pipeline.path.resolve()),
            pipeline_hash=hashlib.sha256(pipeline.path.read_bytes()).hexdigest(),
            trigger=request.trigger,
            git_commit=_git_commit(pipeline.root),
            host=socket.gethostname(),
            pid=os.getpid(),
            params_override=overrides,
        )
        lock.describe(run_id)
        reporter.emit(RunStarted(run_id, pipeline.display_name, plan.order))
        executor = docker_executor.DockerExecutor(client)
        run_stage = StageRunner(
            pipeline=pipeline, run_id=run_id, state=state, store=store, cache=cache, executor=executor,
            reporter=reporter, image_ids=image_ids, input_digests=input_digests, upstream=upstream,
            secrets=secrets, force=force,
        )
        report = parallel.execute(
            plan.order,
            {name: pipeline.stages[name].needs for name in plan.order},
            run_stage,
            policy=parallel.Policy(
                jobs=request.jobs or os.cpu_count() or 1, keep_going=request.keep_going, deadline_s=request.timeout_s
            ),
            capacity=parallel.Capacity(float(os.cpu_count() or 1), host_memory_bytes()),
            demands={name: _demand(pipeline, name) for name in plan.order},
            retry={
                name: parallel.RetryPolicy(s.retries, s.retry_delay, frozenset(s.retry_on))
                for name, s in ((n, pipeline.stages[n]) for n in plan.order)
            },
            cancel=cancel.event,
            reporter=reporter,
            on_cancel=executor.stop_all,
            fatal=(StoreError,),
        )
        results = dict(report.results)
        for name, result in results.items():
            if report.deadline_hit and result.status is StageStatus.CANCELLED:
                results[name] = replace(result, reason=f"cancelled: run timed out after {format_duration(request.timeout_s or 0)}")
            if result.status is StageStatus.SKIPPED or results[name] is not result:  # the runner never saw these
                stage = pipeline.stages[name]
                store.record_stage(run_id, results[name], user=container_user(stage.user), hermetic=not stage.network)
        summary = summarize(run_id, results, cancel if report.cancelled and not report.deadline_hit else None)
        store.finish_run(run_id, summary.status, summary.exit_code)
        reporter.emit(RunFinished(summary))
        return summary


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _demand(pipeline: Pipeline, name: str) -> Any:
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


def reporter_build(reporter: Reporter) -> Callable[[Any], None]:
    """What images.resolve_images reports builds to: BuildStarted, BuildProgress, BuildFinished."""
    return reporter.emit


def _earlier_outputs(plan: Plan, pipeline: Pipeline, store: Store) -> dict[str, Any]:
    """For `--stage`/`--from`: outputs of upstream stages that this run does not execute, from earlier runs."""
    from orchestrator.runner import Upstream

    selected = set(plan.order)
    found: dict[str, Upstream] = {}
    for name in plan.order:
        for up in pipeline.stages[name].needs:
            if up in selected or up in found:
                continue
            last = store.last_success(pipeline.display_name, up)
            if last is None or not last.outputs_path or not last.outputs_digest or not Path(last.outputs_path).is_dir():
                raise UsageError(
                    f"stage {name} needs the outputs of {up} from an earlier run, but there are none; "
                    f"run `pipe run --from {up}` first"
                )
            found[up] = Upstream(Path(last.outputs_path), last.outputs_digest)
    return found


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---- history --------------------------------------------------------------------------------------------------


def latest_run(target: Target) -> tuple[Pipeline, RunInfo | None]:
    loaded = load(target)
    with open_store(loaded) as store:
        return loaded.pipeline, store.latest_run(loaded.pipeline.display_name)


def list_runs(target: Target, status: str | None, trigger: str | None, limit: int) -> list[RunInfo]:
    loaded = load(target)
    with open_store(loaded) as store:
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


def parse_trigger(value: str | None) -> Literal["manual", "schedule"] | None:
    if value not in (None, "manual", "schedule"):
        raise UsageError(f"unknown trigger {value!r}: use manual or schedule")
    return value  # type: ignore[return-value]


def show_run(target: Target, run: str) -> RunInfo:
    loaded = load(target)
    with open_store(loaded) as store:
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
    with open_store(loaded) as store:
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
    return StageLog(info, this, Path(this.log_path))


def follow_log(target: Target, log: StageLog, poll_s: float = 0.3) -> Iterator[bytes]:
    """The lines of `log` (bytes, each with its newline but maybe the last), then, while its stage still runs,
    each line it gains (`pipe logs -f`). Opens the store once. NotFound when there is no file to read."""
    import time

    from orchestrator.errors import NotFound

    loaded = load(target)
    run_id = log.origin or log.run.id
    with open_store(loaded) as store:

        def running() -> bool:
            return _stage_running(store.get_run(run_id, loaded.pipeline.display_name), log.stage.stage)

        while not log.path.exists() and running():
            time.sleep(poll_s)  # started, but its container has not written the log yet
        if not log.path.exists():
            raise NotFound(f"stage {log.stage.stage} of run {run_id} has no log file at {log.path}")
        with open(log.path, "rb") as f:
            partial = b""
            while True:
                chunk = f.read(1 << 16)
                if chunk:
                    *lines, partial = (partial + chunk).split(b"\n")
                    yield from (line + b"\n" for line in lines)
                elif running():
                    time.sleep(poll_s)
                else:
                    rest = partial + f.read()  # what it wrote between the last read and its end
                    yield from (line + b"\n" for line in rest.split(b"\n")[:-1])
                    if rest and not rest.endswith(b"\n"):
                        yield rest.rsplit(b"\n", 1)[-1]
                    return


def metric_history(target: Target, limit: int) -> list[MetricPoint]:
    loaded = load(target)
    with open_store(loaded) as store:
        return store.metric_history(loaded.pipeline.display_name, limit)


def dag(target: Target, fmt: str) -> str:
    from orchestrator import plan as plan_mod

    plan = build_plan(load(target).pipeline)
    render = {"text": plan_mod.to_text, "mermaid": plan_mod.to_mermaid, "dot": plan_mod.to_dot}.get(fmt)
    if render is None:
        raise UsageError(f"unknown format {fmt!r}: use text, mermaid or dot")
    return render(plan)


def schema() -> dict[str, Any]:
    return Pipeline.model_json_schema()


def _predicted_summary(predictions: list[Any]) -> RunSummary:
    results = {
        p.stage: StageResult(p.stage, StageStatus.SKIPPED if p.will_run else StageStatus.CACHED,
                             reason=("would run: " if p.will_run else "") + ", ".join(p.reasons))
        for p in predictions
    }
    return RunSummary("dry-run", RunStatus.SUCCEEDED, results, ExitCode.SUCCESS)


@dataclass(frozen=True)
class StatusReport:
    pipeline: Pipeline
    run: RunInfo | None
    next_run: list[Any]  # runner.Prediction, in plan order


def status(target: Target) -> StatusReport:
    """The latest run and what would run next time and why. Needs no engine: image ids are the ones the latest
    run used (a rebuilt image is found by `pipe run --dry-run`)."""
    from orchestrator.cache import Cache
    from orchestrator.runner import hash_inputs, predict

    loaded = load(target)
    pipeline = loaded.pipeline
    plan = build_plan(pipeline)
    with open_store(loaded) as store:
        run = store.latest_run(pipeline.display_name)
        image_ids: dict[str, str | None] = {}
        for name in plan.order:
            last = store.last_success(pipeline.display_name, name)
            image_ids[name] = last.image_id if last else None
        inputs = hash_inputs(pipeline, plan.order, store.hash_memo())
        predictions = predict(pipeline, plan.order, store, Cache(loaded.state.cache_dir), image_ids, inputs, {},
                              frozenset())
    return StatusReport(pipeline, run, predictions)


def stage_running(target: Target, run_id: str, stage: str) -> bool:
    return _stage_running(show_run(target, run_id), stage)


def _stage_running(info: RunInfo, stage: str) -> bool:
    return info.status == RunStatus.RUNNING and any(s.stage == stage and s.status is None for s in info.stages)


# ---- cache ------------------------------------------------------------------------------------------------------


def cache_entries(target: Target) -> list[Any]:
    from orchestrator.cache import Cache

    return sorted(Cache(load(target).state.cache_dir).entries(), key=lambda m: m.created_at, reverse=True)


def cache_verify(target: Target) -> list[str]:
    from orchestrator.cache import Cache

    return Cache(load(target).state.cache_dir).verify()


def cache_gc(target: Target, keep_runs: int | None, keep_days: float | None, dry_run: bool) -> Any:
    """Remove cache entries that no run among the last `keep_runs` (or the last `keep_days`) references."""
    from orchestrator.cache import Cache

    if keep_runs is None and keep_days is None:
        raise UsageError("say what to keep: --keep-runs N and/or --keep-days D")
    loaded = load(target)
    with open_store(loaded) as store:
        keep = store.referenced_cache_keys(keep_runs=keep_runs, keep_days=keep_days)
    return Cache(loaded.state.cache_dir).gc(keep, dry_run=dry_run)


# ---- schedules ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleReport:
    pipeline: Pipeline
    next_times: list[datetime]  # UTC
    ticks: list[TickInfo]  # what the scheduler did with its latest ticks, newest first


def schedule_report(target: Target, count: int) -> ScheduleReport:
    """The next `count` fire times of the pipeline's schedule, and its `count` latest ticks from history."""
    from orchestrator import cron

    loaded = load(target)
    pipeline = loaded.pipeline
    if pipeline.schedule is None:
        raise UsageError(f"{pipeline.path} has no `schedule:`; add one (cron:, timezone:)")
    with open_store(loaded) as store:
        ticks = store.ticks(pipeline.display_name, count)
    return ScheduleReport(pipeline, cron.next_fire_times(pipeline.schedule, datetime.now(UTC), count), ticks)


def crontab_entry(target: Target) -> Any:
    """The crontab entry for the pipeline's schedule, with absolute paths and the environment it needs."""
    import shutil
    import sys

    from orchestrator import cron, scheduler

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
        state_dir=loaded.state.root, system_timezone=scheduler.system_timezone(),
    )


def install_schedule(target: Target, apply: bool) -> Any:
    """The crontab entry; written into the user's crontab only with `apply`."""
    from orchestrator import scheduler

    entry = crontab_entry(target)
    if apply:
        scheduler.install_crontab(entry, apply=True)
    return entry


def uninstall_schedule(target: Target) -> int:
    from orchestrator import cron, scheduler

    return scheduler.uninstall_crontab(cron.crontab_marker(load(target).pipeline.path.resolve()))


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

    def record_tick(name: str, due_at: datetime, action: Any, reason: str, run_id: str | None) -> None:
        with open_store(load(by_name[name])) as store:
            store.record_tick(name, due_at, action, reason, run_id)

    def last_tick(name: str) -> datetime | None:
        with open_store(load(by_name[name])) as store:
            ticks = store.ticks(name, 1)
        return ticks[0].due_at if ticks else None

    Scheduler(
        paths, load=load_one, run=run, record_tick=record_tick, last_tick=last_tick,
        clock=clock, stop=stop, on_stop=on_stop, wait=wait,
    ).run_forever()
