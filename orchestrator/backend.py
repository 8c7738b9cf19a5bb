"""Where stages run: the parts of an engine that a run needs, behind one seam, so api.py wires an engine without
knowing it and tests substitute a fake one. `DockerBackend` is the local Docker engine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.errors import UsageError
from orchestrator.events import BuildEvents
from orchestrator.executor import ContainerSpec, ExecResult, Executor, OutputSink
from orchestrator.hashing import HashMemo
from orchestrator.imageplan import ImageForecast
from orchestrator.spec import KubePlacement, Pipeline

if TYPE_CHECKING:
    from orchestrator.kube_spec import Placement



class Backend(Protocol):
    stores_outputs: bool  # its executor leaves outputs in the remote's blobs (ExecResult.stored_outputs): swarm

    def executor(self) -> Executor:
        """A new executor for one run."""
        ...

    def forecast_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                        hash_memo: HashMemo | None) -> dict[str, ImageForecast]:
        """What image each stage would run, building, pulling and writing nothing (dry run)."""
        ...

    def resolve_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path, on_event: BuildEvents,
                       hash_memo: HashMemo | None) -> dict[str, str]:
        """stage -> immutable image id, building or pulling what the forecast says is missing."""
        ...

    def capacity(self) -> tuple[float, int]:
        """(cpus, memory bytes) the running stages' caps may add up to; the default for --jobs."""
        ...

    def gpu_problem(self) -> str | None:
        """Why stages cannot get GPUs here ("the engine has no nvidia runtime ..."), or None when they can."""
        ...

    def sweep(self, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
        """Remove containers a dead run of this state dir left behind (is_alive: the run's lease, None when
        history does not know it); the dead runs' ids."""
        ...


class DockerBackend:
    """The local engine. The SDK's client is made when first needed (EngineError then, if the engine does not
    answer); an image forecast on a unix socket reads the engine with the standard library (engine_socket.py), so
    `pipe status` and a dry run do not import the Docker SDK (issue 20)."""

    stores_outputs = False

    def __init__(self, docker_url: str | None = None) -> None:
        self._docker_url = docker_url
        self._sdk: Any = None

    @property
    def _client(self) -> Any:
        if self._sdk is None:
            from orchestrator import docker_executor

            self._sdk = docker_executor.connect(self._docker_url)
        return self._sdk

    def executor(self) -> Executor:
        def make() -> Executor:
            from orchestrator.docker_executor import DockerExecutor

            return DockerExecutor(self._client)

        return OnFirstUse(make)

    def forecast_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                        hash_memo: HashMemo | None) -> dict[str, ImageForecast]:
        from orchestrator import engine_socket

        view = engine_socket.connect_view(self._docker_url)
        if view is None:  # not a unix socket (tcp://, ssh://): the SDK's view
            from orchestrator import images

            return images.forecast_images(pipeline, stages, self._client, memo_path, hash_memo)
        from orchestrator.imageplan import ImageMemo, forecast

        return forecast(pipeline, stages, ImageMemo.load(memo_path), view, hash_memo)

    def resolve_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path, on_event: BuildEvents,
                       hash_memo: HashMemo | None) -> dict[str, str]:
        from orchestrator import engine_socket

        stages = list(stages)
        view = engine_socket.connect_view(self._docker_url)
        if view is not None:  # every image already there (a no-op rerun): no SDK
            from orchestrator.imageplan import resolve_known

            if (known := resolve_known(pipeline, stages, memo_path, view, hash_memo)) is not None:
                return known
        from orchestrator import images

        return images.resolve_images(pipeline, stages, self._client, memo_path, on_event, hash_memo)

    def sweep(self, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
        from orchestrator import engine_socket
        from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE

        if engine_socket.labelled_containers(self._docker_url, [LABEL_MANAGED, f"{LABEL_PIPELINE}={owner}"]) == []:
            return []  # nothing of this state dir on the engine (the usual case): no SDK
        from orchestrator import docker_executor

        return docker_executor.sweep_orphans(self._client, owner, is_alive)

    def gpu_problem(self) -> str | None:
        from orchestrator import docker_executor

        return docker_executor.gpu_problem(self._client)

    def capacity(self) -> tuple[float, int]:
        from orchestrator.hostfiles import host_memory_bytes

        return float(os.cpu_count() or 1), host_memory_bytes()

    def pod_image(self, image: str) -> str:
        """How a Kubernetes node names this local image: its `repo@sha256:` digest once pushed to a registry,
        else its id (a node that was loaded with it, as the test cluster is)."""
        from orchestrator import docker_executor

        return docker_executor.pod_image(self._client, image)


def backend_for(pipeline: Pipeline, docker_url: str | None = None, kind: str | None = None,
                kube_context: str | None = None) -> Backend:
    """The engine the pipeline's `executor:` names, or `kind` (`--executor`), which must then find the fields it
    needs in that block (a swarm's registry and store, a cluster's hand-off). `kube_context` (`--kube-context`)
    replaces `executor.context`; only for the kubernetes executor."""
    config = pipeline.executor
    if kind is not None and kind != config.kind:
        try:
            config = type(config).model_validate({**config.model_dump(), "kind": kind})
        except ValueError as e:
            raise pipeline.error("executor", f"--executor {kind}: {e}".splitlines()[0]) from e
        pipeline = pipeline.model_copy(update={"executor": config}).with_source(pipeline.source)
    if kube_context is not None:
        if config.kind != "kubernetes":
            raise UsageError(f"--kube-context: the executor is {config.kind}, not kubernetes")
        config = config.model_copy(update={"context": kube_context})
        pipeline = pipeline.model_copy(update={"executor": config}).with_source(pipeline.source)
    if config.kind == "kubernetes":
        return KubernetesBackend(pipeline, docker_url)
    if config.kind == "swarm":
        from orchestrator.swarm_backend import SwarmBackend

        return SwarmBackend(pipeline, config.host or docker_url)
    return DockerBackend(docker_url)


class KubernetesBackend:
    """Stages as batch/v1 Jobs (kube_executor.py). Images are built and resolved on the local engine, as for
    Docker, so cache keys are the same on both; a pod gets the image id (`sha256:...`, pull policy Never: the
    nodes already hold it) or, for an image pushed to a registry, its `repo@sha256:...` digest (IfNotPresent)."""

    stores_outputs = False  # its pods upload to presigned URLs; the outputs come to this host

    def __init__(self, pipeline: Pipeline, docker_url: str | None = None) -> None:
        from orchestrator import kube_executor

        self._local = DockerBackend(docker_url)
        self._conf = pipeline.executor
        self._api = kube_executor.connect(self._conf.context, os.environ.get("KUBECONFIG"))
        self._refs: dict[str, str] = {}
        self._placements = {name: kube_placement(stage.kubernetes) for name, stage in pipeline.stages.items()
                            if stage.kubernetes is not None}

    def executor(self) -> Executor:
        from orchestrator.kube_executor import KubernetesExecutor, KubeSettings
        from orchestrator.objectstore import ObjectStore

        assert self._conf.handoff is not None, "spec.Executor requires it for kubernetes"
        settings = KubeSettings(
            namespace=self._conf.namespace, handoff_url=self._conf.handoff, handoff_endpoint=self._conf.endpoint,
            context=self._conf.context, agent_image=self._agent_ref(),
            pending_timeout_s=self._conf.pending_timeout, placements=self._placements)
        return KubernetesExecutor(self._api, settings, ObjectStore(self._conf.handoff, self._conf.endpoint),
                                  self._refs)

    def forecast_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                        hash_memo: HashMemo | None) -> dict[str, ImageForecast]:
        return self._local.forecast_images(pipeline, stages, memo_path, hash_memo)

    def resolve_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path, on_event: BuildEvents,
                       hash_memo: HashMemo | None) -> dict[str, str]:
        ids = self._local.resolve_images(pipeline, stages, memo_path, on_event, hash_memo)
        for image_id in set(ids.values()):
            self._refs[image_id] = self._local.pod_image(image_id)
        return ids

    def _agent_ref(self) -> str:
        return self._local.pod_image(self._conf.agent_image)

    def sweep(self, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
        from orchestrator import kube_executor
        from orchestrator.objectstore import ObjectStore

        assert self._conf.handoff is not None, "spec.Executor requires it for kubernetes"
        store = ObjectStore(self._conf.handoff, self._conf.endpoint)  # the dead attempts' hand-off objects too
        return kube_executor.sweep_jobs(self._api, self._conf.namespace, owner, is_alive, store)

    def gpu_problem(self) -> str | None:
        from orchestrator import kube_executor

        return kube_executor.gpu_problem(self._api)

    def capacity(self) -> tuple[float, int]:
        from orchestrator import kube_executor

        return kube_executor.capacity(self._api)


def kube_placement(spec: KubePlacement) -> Placement:
    from orchestrator.kube_spec import Placement

    return Placement(dict(spec.node_selector),
                     tuple(t.model_dump(exclude_none=True) for t in spec.tolerations))


class OnFirstUse:
    """An Executor made on its first run(), so a run whose every stage is cached never imports the SDK. A
    stop_all() before then is passed on once it exists (its later runs then return CANCELLED)."""

    def __init__(self, make: Callable[[], Executor]) -> None:
        self._make, self._stops = make, 0
        self._made: Executor | None = None
        self._lock = threading.RLock()  # re-entrant: stop_all may come from a signal handler on this thread

    def _executor(self) -> Executor:
        with self._lock:
            if self._made is None:
                made = self._make()
                for _ in range(self._stops):
                    made.stop_all()
                self._made = made
            return self._made

    def run(self, spec: ContainerSpec, on_output: OutputSink) -> ExecResult:
        return self._executor().run(spec, on_output)

    def stop_all(self) -> None:
        with self._lock:
            self._stops += 1
            made = self._made
        if made is not None:
            made.stop_all()
