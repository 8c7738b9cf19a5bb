"""The use cases of the remote cache (`remote:` in pipeline.yaml): which CacheStore a command gets, the check
before a run, the push after it (`push: auto`), `pipe push`, `pipe pull` and `pipe cache gc --remote`.

Part of api's layer (it wires real parts: the local cache, the object store, history); kept apart so that
api.py stays a table of contents. boto3 is imported (through objectstore) only when a pipeline has a remote.
Credentials come from boto3's standard chain alone; no message here or below carries one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError
from orchestrator.events import Notice, Pushed, Reporter
from orchestrator.results import RunStatus, RunSummary, StageStatus
from orchestrator.spec import Pipeline
from orchestrator.state import StateDir

if TYPE_CHECKING:
    from orchestrator.api import Target
    from orchestrator.backend import Backend
    from orchestrator.cache import Cache
    from orchestrator.cachestore import LayeredCache, Progress, RemoteCache, SyncReport
    from orchestrator.remote import RemoteGcReport

DEFAULT_GRACE_S = 24 * 3600.0  # `cache gc --remote` leaves objects younger than this (pushes in flight)


def cache_store(pipeline: Pipeline, state: StateDir, *, fetch: bool, progress: Progress | None = None
                ) -> Cache | LayeredCache:
    """The CacheStore of a pipeline: the local cache, or, with a `remote:` block, the local cache then the
    remote (cachestore.LayeredCache; `fetch`: a remote hit is brought into the local cache, for a run)."""
    from orchestrator.cache import Cache

    local = Cache(state.cache_dir)
    if pipeline.remote is None:
        return local
    from orchestrator.cachestore import LayeredCache

    return LayeredCache(local, remote_cache(pipeline), fetch, progress)


def remote_cache(pipeline: Pipeline) -> RemoteCache:
    """The RemoteCache of the `remote:` block; UsageError when there is none."""
    if pipeline.remote is None:
        raise UsageError(f"{pipeline.path} has no `remote:` block; add one (url: s3://bucket/prefix/)")
    from orchestrator.cachestore import RemoteCache
    from orchestrator.objectstore import ObjectStore

    return RemoteCache(ObjectStore(pipeline.remote.url, pipeline.remote.endpoint))


def check_remote(pipeline: Pipeline, caches: Any, reporter: Reporter) -> None:
    """Before a run: RemoteError (exit 4, one line) when the remote refuses us (credentials, bucket); a remote
    that does not answer is a warning, and the run goes on with the local cache alone."""
    if pipeline.remote is None:
        return  # before any import: a pipeline without a remote never loads boto3
    from orchestrator.cachestore import LayeredCache
    from orchestrator.objectstore import RemoteUnreachable

    if not isinstance(caches, LayeredCache):
        return
    try:
        caches.remote.store.check()
    except RemoteUnreachable as e:
        caches.offline = str(e)
        reporter.emit(Notice(f"{e}; this run uses the local cache alone"))


def auto_push(pipeline: Pipeline, caches: Any, summary: RunSummary, order: tuple[str, ...],
              reporter: Reporter) -> SyncReport | None:
    """`push: auto`: once a run has ended (not cancelled), the entries of its stages that succeeded or were
    restored from the local cache go to the remote (entries it fetched from there do not go back). A failed push
    is a warning, never the run's failure: `pipe push RUN`, or the next run, sends what is missing."""
    if pipeline.remote is None or pipeline.remote.push != "auto":
        return None  # before any import: a pipeline without a remote never loads boto3
    from orchestrator.cachestore import LayeredCache, push, pushable

    if not isinstance(caches, LayeredCache):
        return None
    if summary.status is RunStatus.CANCELLED:
        return None
    stages = [(name, r.cache_key, r.status is StageStatus.SUCCEEDED,
               r.cache_key is not None and caches.from_remote(r.cache_key))
              for name in order if (r := summary.results.get(name)) is not None and r.ok
              and pipeline.stages[name].cache]
    items, check_first = pushable(stages)
    retry = f"`pipe push {summary.run_id}` (or the next run) sends them"
    if not items:
        return None
    if caches.offline is not None:
        reporter.emit(Notice(f"not pushed: {caches.offline}; {retry}"))
        return None
    report = push(caches.local, caches.remote, items, check_first=check_first, run_id=summary.run_id)
    if report.error is not None:
        reporter.emit(Notice(f"push to {caches.url} failed: {report.error}; the run's outputs are in the local "
                             f"cache, and {retry}"))
    elif report.count("pushed"):
        reporter.emit(Pushed(report.remote, report.count("pushed"), report.count("present"), report.files,
                             report.bytes, report.seconds))
    return report


def push_run(target: Target, run: str = "latest", progress: Progress | None = None) -> SyncReport:
    """`pipe push [RUN]`: the local cache entries of RUN's stages (succeeded or cached) to the remote."""
    from orchestrator import api
    from orchestrator.cache import Cache
    from orchestrator.cachestore import push

    loaded = api.load(target)
    remote = remote_cache(loaded.pipeline)
    remote.store.check()
    with api.read_store(loaded) as store:
        info = store.get_run(run, loaded.pipeline.display_name)
    items = [(s.stage, s.cache_key) for s in info.stages
             if s.cache_key and s.status in (StageStatus.SUCCEEDED, StageStatus.CACHED)]
    return push(Cache(loaded.state.cache_dir), remote, items, progress=progress, run_id=info.id)


def pull(target: Target, run: str | None = None, stage: str | None = None, backend: Backend | None = None,
         progress: Progress | None = None) -> SyncReport:
    """`pipe pull [RUN] [--stage S]`: remote entries into the local cache. With RUN, the entries its stages
    recorded (history may be shared, `--db`), and their outputs folders where this host lacks them (a swarm
    run left them in the remote, --fetch); without, the entries the next run would look up: the forecast
    of `pipe status` (a stage whose key cannot be known yet, its image not built here or an upstream missing,
    is reported `unknown`, with why)."""
    from orchestrator import api
    from orchestrator.cache import Cache
    from orchestrator.cachestore import LayeredCache
    from orchestrator.cachestore import pull as pull_entries
    from orchestrator.plan import Selection, build_plan

    loaded = api.load(target)
    pipeline = loaded.pipeline
    remote = remote_cache(pipeline)
    remote.store.check()
    if stage is not None and stage not in pipeline.stages:
        build_plan(pipeline, Selection(stage=stage))  # UsageError with a did-you-mean
    layered = LayeredCache(Cache(loaded.state.cache_dir), remote, fetch=True, progress=progress)
    wanted = (lambda name: name == stage) if stage is not None else (lambda name: True)
    if run is not None:
        with api.read_store(loaded) as store:
            info = store.get_run(run, pipeline.display_name)
        done = [s for s in info.stages if s.cache_key and wanted(s.stage)
                and s.status in (StageStatus.SUCCEEDED, StageStatus.CACHED)]
        report = pull_entries(layered, [(s.stage, s.cache_key, "") for s in done], run_id=info.id)
        for row in done:
            folder = Path(row.outputs_path) if row.outputs_path else None
            found = layered.local.lookup(row.cache_key or "")
            if folder is not None and not folder.exists() and found.manifest is not None:
                layered.local.restore(found.manifest, folder)
        return report
    probe = LayeredCache(layered.local, remote, fetch=False)
    decisions = api.next_run(target, backend, cache=probe)
    items = [(d.stage, d.ingredients.key() if d.ingredients is not None else None, ", ".join(d.reasons))
             for d in decisions if wanted(d.stage) and pipeline.stages[d.stage].cache]
    return pull_entries(layered, items)


def remote_gc(target: Target, keep_runs: int | None, keep_days: float | None, dry_run: bool,
              grace_s: float = DEFAULT_GRACE_S) -> RemoteGcReport:
    """`pipe cache gc --remote`: the remote's entries that no run kept by the local rules uses (api.kept_keys:
    the same as `pipe cache gc`), and the blobs no kept entry names, except what is younger than `grace_s`
    (another machine's push in flight, or its entries that this history does not know yet)."""
    from orchestrator import api
    from orchestrator.remote import gc_remote

    if keep_runs is None and keep_days is None:
        raise UsageError("say what to keep: --keep-runs N and/or --keep-days D")
    loaded = api.load(target)
    remote = remote_cache(loaded.pipeline)
    remote.store.check()
    now = datetime.now(UTC)
    with api.read_store(loaded) as store:
        keep = api.kept_keys(loaded, store, keep_runs, keep_days, now)
    return gc_remote(remote.store, keep, grace_s, now, dry_run)
