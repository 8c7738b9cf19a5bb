"""The serving use cases: `pipe serve up|status|logs|down|rollback|check`, `pipe promote`, and the auto-promotion
at the end of a run whose gate passed. Wires history, the engine (serve_docker), the proxy config and notify.

Blue/green behind a pipe-owned nginx: the new model's replicas start beside the old ones, each must answer its
health path `healthy_after` times in a row within `start_timeout`, then the back proxy's config names them and
it reloads gracefully (the front, holding the clients' connections, is never reloaded: serve_proxy); pipe waits
until every old worker has finished (drained) and only then stops the old replicas. A new model that never
becomes healthy is removed, the proxy is never touched, the failure is recorded and notified, and ServeError
(exit 1) says so. One flock (runs/serve/lock) serialises the serving commands.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import notify, serve_proxy
from orchestrator.api import Loaded, Target, load, open_store
from orchestrator.errors import EngineError, PipeError, ServeError, UsageError
from orchestrator.executor import ContainerSpec, Mount
from orchestrator.results import RunStatus
from orchestrator.serve_proxy import Routing
from orchestrator.spec import Pipeline, Serve, Stage
from orchestrator.store.records import RunInfo, ServeEventInfo

if TYPE_CHECKING:
    from orchestrator.serve_docker import Found, Replica, ServeEngine
    from orchestrator.store.store import Store

SERVE_STAGE = "pipe-serve"  # the name the serving image is built and remembered under (images.json)
SERVED_EVENTS = ("started", "promoted", "rolled_back")  # events after which a run's model is the one served
PROXY_START_S = 30.0


@dataclass(frozen=True)
class ServeStatus:
    pipeline: str
    up: bool
    run_id: str | None
    digest: str | None
    since: str | None
    publish: str | None
    proxy: str | None  # the proxy container's engine status
    replicas: tuple[dict[str, Any], ...] = ()
    history: tuple[ServeEventInfo, ...] = ()
    message: str = ""
    problems: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "up": self.up, "run_id": self.run_id, "digest": self.digest,
                "since": self.since, "publish": self.publish, "proxy": self.proxy, "replicas": list(self.replicas),
                "history": [e.to_json() for e in self.history], "message": self.message,
                "problems": list(self.problems)}


@dataclass(frozen=True)
class Model:
    run_id: str
    digest: str
    folder: Path
    metrics: dict[str, dict[str, float]]


class _Serving:
    """One serving command's parts: the pipeline, its serve block, the engine view, history, the proxy folder."""

    def __init__(self, loaded: Loaded, store: Store, docker_url: str | None) -> None:
        from orchestrator import docker_executor
        from orchestrator.serve_docker import ServeEngine

        self.loaded, self.store, self.docker_url = loaded, store, docker_url
        self.pipeline, self.serve = loaded.pipeline, serve_block(loaded.pipeline)
        self.name = loaded.pipeline.display_name
        self.folder = loaded.state.serve_dir
        self.client = docker_executor.connect(docker_url)
        self.engine: ServeEngine = ServeEngine(self.client, str(loaded.state.root))
        self.problems: list[str] = []
        self.redact = secret_values(loaded.pipeline)  # kept out of what a replica printed: history, payloads, errors

    def record(self, event: str, run_id: str | None = None, digest: str | None = None, ok: bool = True,
               detail: str = "", notify_as: str | None = None) -> None:
        self.store.record_serve_event(self.name, event, run_id, digest, ok, detail)
        if notify_as is not None:
            self.problems += notify.send(self.pipeline.notify, notify.payload(notify_as, self.name, run_id, digest,
                                                                              detail), redact=self.redact)

    # --- the model and the containers ----------------------------------------------------------------------

    def model(self, run: str) -> Model:
        info = self.store.get_run(run, self.name)
        if problem := unservable(info, self.pipeline):
            raise UsageError(f"run {info.id} cannot be promoted: {problem}")
        stage = info.stage(self.serve.model)
        assert stage is not None and stage.outputs_path is not None and stage.outputs_digest is not None
        folder = Path(stage.outputs_path)
        if not folder.is_dir():
            raise UsageError(f"run {info.id}: the outputs of {self.serve.model} are gone ({folder}); pruned by gc?")
        return Model(info.id, stage.outputs_digest, folder, {s.stage: s.metrics for s in info.stages if s.metrics})

    def image(self) -> str:
        from orchestrator import images

        stage = Stage(image=self.serve.image, build=self.serve.build, command=self.serve.command, env={})
        pipeline = self.pipeline.model_copy(update={"stages": {SERVE_STAGE: stage}}).with_source(self.pipeline.source)
        return images.resolve_images(pipeline, [SERVE_STAGE], self.client, self.loaded.state.images_memo,
                                     lambda _event: None, self.store.hash_memo())[SERVE_STAGE]

    def start(self, model: Model) -> list[Replica]:
        """The model's replicas, healthy; none left behind when one is not (then ServeError, recorded)."""
        image_id, health = self.image(), self.serve.health
        self.engine.ensure_network()
        started: list[Replica] = []
        try:
            for _ in range(self.serve.replicas):
                started.append(self.engine.start_replica(self._replica_spec(model, image_id), model.run_id,
                                                         model.digest, self.serve.port, self.serve.restarts))
            ready = [wait_healthy(self.engine, r, health.path, health.interval, health.timeout,
                                  health.healthy_after, health.start_timeout) for r in started]
        except BaseException:
            for replica in started:
                with suppress(PipeError):
                    self.engine.remove(replica.container_id, grace_s=1)
            raise
        if any(r is None for r in ready):
            logs = scrub(b"".join(self.engine.logs(started[0].container_id, tail=5)).decode(errors="replace").strip(),
                         self.redact)
            for replica in started:
                self.engine.remove(replica.container_id, grace_s=1)
            why = (f"no healthy answer at {health.path} within {health.start_timeout:g} s"
                   + (f"; last output: {' | '.join(logs.splitlines()[-3:])}" if logs else ""))
            self.record("unhealthy", model.run_id, model.digest, ok=False, detail=why, notify_as="serve_unhealthy")
            raise ServeError(f"run {model.run_id}'s model did not become healthy: {why}")
        return [r for r in ready if r is not None]

    def _replica_spec(self, model: Model, image_id: str) -> ContainerSpec:
        caps, defaults = self.serve.resources, self.pipeline.defaults.resources
        env = {"PIPE_RUN_ID": model.run_id, "PIPE_MODEL_DIGEST": model.digest, "PIPE_SERVE_PORT": str(self.serve.port),
               "PIPE_MODEL_METRICS": json.dumps(model.metrics, sort_keys=True), **self.serve.env}
        return ContainerSpec(
            name="serve", image_id=image_id, command=self.serve.argv(), env=env,
            mounts=(Mount(model.folder, "/model", read_only=True),), workdir="/model",
            cpus=caps.cpus if caps.cpus is not None else defaults.cpus,
            memory_bytes=caps.memory if caps.memory is not None else defaults.memory,
            pids=caps.pids if caps.pids is not None else defaults.pids,
            user=f"{os.getuid()}:{os.getgid()}", network=True, tmp_bytes=self.pipeline.defaults.tmp_size)

    def start_proxy(self, routing: Routing) -> None:
        serve_proxy.write(self.folder / "proxy", routing)
        spec = ContainerSpec(name="serve-proxy", image_id=self.engine.proxy_image(), command=serve_proxy.PROXY_COMMAND,
                             mounts=(Mount(self.folder / "proxy", serve_proxy.CONF_TARGET, read_only=True),),
                             workdir="/tmp", cpus=1.0, memory_bytes=128 * 1024**2, pids=64,
                             user=serve_proxy.PROXY_USER, network=True, tmp_bytes=64 * 1024**2)
        self.engine.start_proxy(spec, self.serve.publish_host, self.serve.publish_port)
        if not _poll(lambda: _answers(self.serve), PROXY_START_S):
            raise ServeError(f"the serving proxy does not answer on {self.serve.publish}")

    def switch(self, new: list[Replica], model: Model) -> None:
        """Route to `new`, wait until nginx's old workers drained, then stop the replicas routed to before."""
        old = serve_proxy.read(self.folder / "proxy")
        before = set(self.engine.workers())
        serve_proxy.write(self.folder / "proxy", Routing(model.run_id, model.digest,
                                                         tuple((r.container_id, r.address or "") for r in new)))
        try:
            self.engine.reload_proxy()
            took = _poll(lambda: self.engine.reloaded(before), serve_proxy.DRAIN_S + 10)
        except EngineError:
            took = False
        if not took:
            serve_proxy.write(self.folder / "proxy", old)
            with suppress(EngineError):
                self.engine.reload_proxy()
            for replica in new:
                self.engine.remove(replica.container_id, grace_s=1)
            raise ServeError("the serving proxy did not take the new configuration; the old model keeps serving")
        keep = {r.container_id for r in new}
        for replica in self.engine.find().replicas:
            if replica.container_id not in keep:
                self.engine.remove(replica.container_id)

    def live(self) -> tuple[Found, Routing, bool]:
        """What exists, what the proxy routes to, and whether that is serving (proxy running, replicas healthy)."""
        found, routing = self.engine.find(), serve_proxy.read(self.folder / "proxy")
        by_id = {r.container_id: r for r in found.replicas}
        health = self.serve.health
        ok = (found.proxy_status == "running" and found.proxy_current and bool(routing.replicas)
              and all(cid in by_id and _healthy(by_id[cid].address, health.path, health.timeout)
                      for cid, _ in routing.replicas))
        return found, routing, ok

    def teardown(self) -> None:
        found = self.engine.find()
        for replica in found.replicas:
            self.engine.remove(replica.container_id, grace_s=2)
        if found.proxy_id is not None:
            self.engine.remove(found.proxy_id, grace_s=2)
        self.engine.remove_network()
        serve_proxy.write(self.folder / "proxy", serve_proxy.EMPTY)


def secret_values(pipeline: Pipeline) -> tuple[str, ...]:
    """The values of the pipeline's secrets that this process can see (its environment, the secrets file): a model
    folder a stage wrote may hold one, and the replica print it, so what it printed is scrubbed of them."""
    from orchestrator import loader

    try:
        return tuple(v for v in loader.resolve_secrets(pipeline, os.environ).values() if v)
    except PipeError:  # one is not set here: scrub those that are
        names = {name for stage in pipeline.stages.values() for name in stage.secrets}
        return tuple(os.environ[name] for name in sorted(names) if os.environ.get(name))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def serve_block(pipeline: Pipeline) -> Serve:
    if pipeline.serve is None:
        raise UsageError(f"{pipeline.path} has no `serve:` block: nothing to serve")
    return pipeline.serve


def unservable(info: RunInfo, pipeline: Pipeline, auto: bool = False) -> str | None:
    """Why a run's model may not be served ("" never): not succeeded, a gate failed, the model stage missing;
    `auto` also refuses a run whose gates were not checked (--no-gate)."""
    serve = serve_block(pipeline)
    if info.status is not RunStatus.SUCCEEDED:
        failed = [s.stage for s in info.stages if s.gate_passed is False]
        return f"its gate failed ({', '.join(failed)})" if failed else f"it {info.status.value}"
    stage = info.stage(serve.model)
    if stage is None or stage.outputs_path is None or stage.outputs_digest is None:
        return f"it has no outputs of stage {serve.model}"
    if auto and any(info.stage(n) is None or info.stage(n).gate_passed is not True  # type: ignore[union-attr]
                    for n, s in pipeline.stages.items() if s.gate is not None):
        return "its gates were not checked"
    return None


def wait_healthy(engine: ServeEngine, replica: Replica, path: str, interval_s: float, timeout_s: float,
                 healthy_after: int, start_timeout_s: float) -> Replica | None:
    """The replica (with its address) once it answered `healthy_after` times in a row; None at the deadline."""
    deadline, streak = time.monotonic() + start_timeout_s, 0
    current: Replica | None = replica
    while time.monotonic() < deadline:
        current = engine.replica(replica.container_id)
        if current is None:
            return None
        if current.address is not None and _healthy(current.address, path, timeout_s):
            streak += 1
            if streak >= healthy_after:
                return current
        else:
            streak = 0
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())) if streak else min(interval_s, 0.2))
    return None


def _healthy(address: str | None, path: str, timeout_s: float) -> bool:
    from orchestrator.serve_docker import healthy

    return healthy(address, path, timeout_s)


def _answers(serve: Serve) -> bool:
    from orchestrator.serve_docker import http_get

    return http_get(f"{serve.publish_host}:{serve.publish_port}", serve.health.path, serve.health.timeout) is not None


def _poll(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)


@contextmanager
def _serve_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # serving commands are short; a second one waits its turn
        yield
    finally:
        os.close(fd)


@contextmanager
def _serving(target: Target, docker_url: str | None, loaded: Loaded | None = None,
             store: Store | None = None) -> Iterator[_Serving]:
    loaded = loaded or load(target)
    serve_block(loaded.pipeline)
    if store is not None:
        with _serve_lock(loaded.state.serve_dir):
            yield _Serving(loaded, store, docker_url)
        return
    with open_store(loaded) as opened, _serve_lock(loaded.state.serve_dir):
        yield _Serving(loaded, opened, docker_url)


def current_run(events: list[ServeEventInfo]) -> str | None:
    """The run whose model was served last (newest event first)."""
    served = served_event(events)
    return served.run_id if served is not None else None


def served_event(events: list[ServeEventInfo]) -> ServeEventInfo | None:
    """The event that served the current model (newest event first): its run and the model's digest."""
    return next((e for e in events if e.event in SERVED_EVENTS and e.ok and e.run_id), None)


def held_runs(events: list[ServeEventInfo], routing: Routing) -> dict[str, str]:
    """The runs whose model folders serving needs (run id -> why), so `pipe gc` keeps them: the served one, the
    one rollback goes back to, and the one the proxy routes to (the same run unless a killed pipe left it)."""
    held: dict[str, str] = {}
    if routing.run_id:
        held[routing.run_id] = "the serving proxy routes to it"
    if (served := current_run(events)) is not None:
        held[served] = "it is the served model"
    if (back := previous_run(events)) is not None:
        held.setdefault(back, "`pipe serve rollback` goes back to it")
    return held


def previous_run(events: list[ServeEventInfo]) -> str | None:
    """The run served before the current one: what `pipe serve rollback` goes back to."""
    served = [e.run_id for e in events if e.event in SERVED_EVENTS and e.ok and e.run_id]
    return next((run for run in served if run != served[0]), None) if served else None
