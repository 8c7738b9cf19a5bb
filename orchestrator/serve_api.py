"""The serving commands as use cases (cli.py calls these; serving.py holds the parts they share).

up:       serve RUN (default: the run served last, else the latest run whose gate passed); returns once healthy.
promote:  swap the served model for RUN's without downtime (or record it, when nothing is served yet).
rollback: promote the run served before the current one.
down:     remove the proxy, every replica and the network, wherever a killed pipe left them.
status:   what the engine runs (found by label), its health, and the recorded history; writes nothing.
check:    records a health change or an engine restart since the last record, and notifies serve_unhealthy.
after_run: the hook at the end of `pipe run`: notifies failed / gate_failed, auto-promotes a passing run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import suppress
from typing import TYPE_CHECKING

from orchestrator import notify, serve_proxy
from orchestrator.api import Loaded, Target, load, read_store
from orchestrator.errors import EngineError, PipeError, ServeError, StoreError, UsageError
from orchestrator.results import RunStatus, RunSummary
from orchestrator.serving import (
    SERVED_EVENTS,
    Model,
    ServeStatus,
    _Serving,
    _serving,
    current_run,
    previous_run,
    serve_block,
    served_event,
    unservable,
)
from orchestrator.store.records import iso_utc

if TYPE_CHECKING:
    from orchestrator.spec import Pipeline
    from orchestrator.store.records import RunHistory
    from orchestrator.store.store import Store


def up(target: Target, run: str | None = None, docker_url: str | None = None) -> ServeStatus:
    with _serving(target, docker_url) as s:
        found, routing, ok = s.live()
        if ok and (run is None or s.store.get_run(run, s.name).id == routing.run_id):
            keep = {cid for cid, _ in routing.replicas}
            for replica in found.replicas:  # left by a promotion whose pipe was killed
                if replica.container_id not in keep:
                    s.engine.remove(replica.container_id, grace_s=1)
            s.engine.reload_proxy()  # idempotent: the file may be newer than what a killed pipe reloaded
            return _status(s, "already serving")
        if ok:
            return _promote(s, s.model(str(run)), "promoted", "pipe serve up --run")
        s.teardown()  # a proxy without healthy replicas, or replicas without a proxy: start clean
        model = s.model(run or _default_run(s))
        replicas = s.start(model)
        try:
            s.start_proxy(serve_proxy.Routing(model.run_id, model.digest,
                                              tuple((r.container_id, r.address or "") for r in replicas)))
        except BaseException:
            s.teardown()  # nothing half-started stays behind
            raise
        s.record("started", model.run_id, model.digest, detail=f"{len(replicas)} replica(s) at {s.serve.publish}")
        return _status(s, "started")


def promote(target: Target, run: str, docker_url: str | None = None, why: str = "pipe promote") -> ServeStatus:
    with _serving(target, docker_url) as s:
        return _promote(s, s.model(run), "promoted", why)


def rollback(target: Target, docker_url: str | None = None) -> ServeStatus:
    with _serving(target, docker_url) as s:
        back = previous_run(s.store.serve_events(s.name, limit=None))
        if back is None:
            raise UsageError("nothing to roll back to: history records no earlier served run")
        return _promote(s, s.model(back), "rolled_back", "pipe serve rollback")


def _promote(s: _Serving, model: Model, event: str, why: str) -> ServeStatus:
    _, routing, ok = s.live()
    if routing.run_id == model.run_id and ok:
        return _status(s, f"run {model.run_id} is already served")
    if not ok:  # nothing served: the next `pipe serve up` serves this model
        s.record(event, model.run_id, model.digest, detail=f"{why}; not serving yet", notify_as="promoted")
        return _status(s, f"run {model.run_id} promoted; `pipe serve up` serves it")
    try:
        new = s.start(model)
        s.switch(new, model)
    except ServeError as e:
        s.record("promote_failed", model.run_id, model.digest, ok=False, detail=str(e), notify_as="promote_failed")
        raise ServeError(f"{e}; run {routing.run_id} keeps serving") from e
    s.record(event, model.run_id, model.digest, detail=f"{why}; replaced run {routing.run_id}",
             notify_as="rolled_back" if event == "rolled_back" else "promoted")
    return _status(s, f"now serving run {model.run_id}")


def down(target: Target, docker_url: str | None = None) -> ServeStatus:
    with _serving(target, docker_url) as s:
        found = s.engine.find()
        routing = serve_proxy.read(s.folder / "proxy")
        s.teardown()
        if found.proxy_id or found.replicas or found.network:
            s.record("stopped", routing.run_id, routing.digest,
                     detail=f"removed {len(found.replicas)} replica(s) and the proxy")
        return _status(s, "stopped")


def check(target: Target, docker_url: str | None = None) -> ServeStatus:
    """Record what changed since the last record: health lost or back, engine restarts of a crashed replica."""
    with _serving(target, docker_url) as s:
        events = s.store.serve_events(s.name, limit=None)
        found, routing, ok = s.live()
        last_health = next((e for e in events if e.event in ("healthy", "unhealthy", *SERVED_EVENTS, "stopped")), None)
        was_ok = last_health is not None and last_health.event != "unhealthy" and last_health.event != "stopped"
        restarts = sum(r.restarts for r in found.replicas if r.container_id in {c for c, _ in routing.replicas})
        seen = max((int(e.detail.split()[0]) for e in events if e.event == "restarted" and e.run_id == routing.run_id
                    and e.detail.split()[:1] != [] and e.detail.split()[0].isdigit()), default=0)
        if restarts > seen:
            s.record("restarted", routing.run_id, routing.digest, ok=False,
                     detail=f"{restarts} restart(s) by the engine (bounded by serve.restarts={s.serve.restarts})",
                     notify_as="serve_unhealthy")
        if routing.replicas and ok != was_ok:
            s.record("healthy" if ok else "unhealthy", routing.run_id, routing.digest, ok=ok,
                     detail="health check answered" if ok else f"no healthy answer at {s.serve.health.path}",
                     notify_as=None if ok else "serve_unhealthy")
        return _status(s, "healthy" if ok else "unhealthy")


def status(target: Target, history: bool = False, docker_url: str | None = None) -> ServeStatus:
    """Read-only: the history as it is (never created or migrated) and what the engine runs."""
    from orchestrator import docker_executor
    from orchestrator.serve_docker import ServeEngine, healthy

    loaded = load(target)
    serve = serve_block(loaded.pipeline)
    name = loaded.pipeline.display_name
    events = []
    if (loaded.state.root / "pipe.db").exists() or not loaded.db_url.startswith("sqlite"):
        with suppress(StoreError), read_store(loaded) as store:  # too old a history: no serving events yet
            events = store.serve_events(name, limit=None if history else 20)
    engine = ServeEngine(docker_executor.connect(docker_url), str(loaded.state.root))
    found, routing = engine.find(), serve_proxy.read(loaded.state.serve_dir / "proxy")
    routed = {cid for cid, _ in routing.replicas}
    replicas = tuple({"id": r.container_id[:12], "name": r.name, "run_id": r.run_id, "status": r.status,
                      "restarts": r.restarts, "routed": r.container_id in routed,
                      "healthy": healthy(r.address, serve.health.path, serve.health.timeout),
                      "requests": _requests(r.address)} for r in found.replicas)
    up_now = found.proxy_status == "running" and any(r["routed"] and r["healthy"] for r in replicas)
    since = next((e.at for e in events if e.event in SERVED_EVENTS and e.ok and e.run_id == routing.run_id), None)
    return ServeStatus(pipeline=name, up=up_now, run_id=routing.run_id if found.proxy_id else None,
                       digest=routing.digest if found.proxy_id else None, since=iso_utc(since),
                       publish=serve.publish, proxy=found.proxy_status, replicas=replicas,
                       history=tuple(events) if history else (), message="serving" if up_now else "not serving")


def logs(target: Target, follow: bool = False, docker_url: str | None = None) -> Iterator[bytes]:
    """The routed replicas' output (the first one's when following)."""
    from orchestrator import docker_executor
    from orchestrator.serve_docker import ServeEngine

    loaded = load(target)
    serve_block(loaded.pipeline)
    engine = ServeEngine(docker_executor.connect(docker_url), str(loaded.state.root))
    routing = serve_proxy.read(loaded.state.serve_dir / "proxy")
    ids = [cid for cid, _ in routing.replicas] or [r.container_id for r in engine.find().replicas]
    if not ids:
        raise UsageError("nothing is served: no replica to show the logs of")
    for cid in ids[:1] if follow else ids:
        yield from engine.logs(cid, follow=follow)


def settled(pipeline: Pipeline, summary: RunSummary, history: RunHistory) -> bool:
    """Whether the end of this run has nothing to do, so after_run need not be called: a failure with no one to
    notify, a run that promotes nothing, or one whose model is the one served already (the same digest: a rerun
    that restored it from the cache), which swaps and records nothing. Reads the serving events only."""
    if summary.status is RunStatus.FAILED:
        return not pipeline.notify
    if pipeline.serve is None or pipeline.serve.promote != "auto" or summary.status is not RunStatus.SUCCEEDED:
        return True
    model = summary.results.get(pipeline.serve.model)
    served = served_event(history.serve_events(pipeline.display_name, limit=None))
    return served is not None and model is not None and model.outputs_digest is not None and \
        served.digest == model.outputs_digest


def after_run(loaded: Loaded, store: Store, summary: RunSummary, docker_url: str | None = None,
              redact: Iterable[str] = ()) -> list[str]:
    """The end of `pipe run`: notify a failed run; auto-promote one whose gates passed. Never raises: a problem
    (engine, unhealthy model, receiver down) is recorded and returned as lines, the run's result stands."""
    pipeline = loaded.pipeline
    name = pipeline.display_name
    try:
        info = store.get_run(summary.run_id, name)
        if summary.status is RunStatus.FAILED:
            gate = [s.stage for s in info.stages if s.gate_passed is False]
            event = "gate_failed" if gate else "failed"
            detail = f"gate failed: {', '.join(gate)}" if gate else "; ".join(
                f"{s.stage}: {s.reason}" for s in info.stages if s.status is not None and s.status.value == "failed")
            return notify.send(pipeline.notify, notify.payload(event, name, info.id, None, detail), redact=redact)
        if pipeline.serve is None or pipeline.serve.promote != "auto" or summary.status is not RunStatus.SUCCEEDED:
            return []
        if why := unservable(info, pipeline, auto=True):
            return [f"not promoted: {why}"]
        with _serving(Target(pipeline.path), docker_url, loaded=loaded, store=store) as s:
            try:
                _promote(s, s.model(info.id), "promoted", f"auto: run {info.id} passed its gate")
            except ServeError as e:
                return [str(e), *s.problems]
            return s.problems
    except (EngineError, StoreError, UsageError, PipeError) as e:
        return [f"serving: {e}"]


def _status(s: _Serving, message: str) -> ServeStatus:
    found, routing, ok = s.live()
    events = s.store.serve_events(s.name, limit=None)
    since = next((e.at for e in events if e.event in SERVED_EVENTS and e.ok and e.run_id == routing.run_id), None)
    return ServeStatus(pipeline=s.name, up=ok, run_id=routing.run_id, digest=routing.digest, since=iso_utc(since),
                       publish=s.serve.publish, proxy=found.proxy_status,
                       replicas=tuple({"id": r.container_id[:12], "name": r.name, "run_id": r.run_id,
                                       "status": r.status, "restarts": r.restarts} for r in found.replicas),
                       message=message, problems=tuple(s.problems))


def _default_run(s: _Serving) -> str:
    served = current_run(s.store.serve_events(s.name, limit=None))
    if served is not None:
        return served
    for info in s.store.list_runs(s.name, status=RunStatus.SUCCEEDED, limit=50, with_stages=True):
        if unservable(info, s.pipeline) is None:
            return info.id
    raise UsageError(f"no run of {s.name} passed its gate: nothing to serve (run `pipe run` first)")


def _requests(address: str | None) -> int | None:
    """The request count the image reports in /metadata, if it does."""
    import json

    from orchestrator.serve_docker import http_get

    if address is None:
        return None
    answer = http_get(address, "/metadata", 1.0)
    if answer is None or answer[0] != 200:
        return None
    try:
        value = json.loads(answer[1]).get("requests")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None

