"""A Docker Swarm as the engine of a run (backend.Backend): images built by the manager's engine and pushed to the
registry, stages run by SwarmExecutor, the hand-off agent image, the sweep of what a dead run left.

Images: `build:` contexts and `image:` references are resolved on the manager (images.resolve_images with the
manager's client, the pipeline's images already there as cache sources), then pushed to `registry/pipe/<stage>:<id>`; the runner keeps the image id (the cache key keeps
it), the executor runs `registry/pipe/<stage>@sha256:<manifest>`, never a tag or a bare id.

The agent image (busybox, rclone and b3sum, about 56 MB) is made from this host's own binaries, imported on the manager
and pushed, once per registry: nothing is pulled from anywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

import docker
import docker.errors

from orchestrator import handoff
from orchestrator.docker_executor import ENGINE_FAULTS, connect, short_reason
from orchestrator.errors import EngineError
from orchestrator.events import Event, Notice
from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE, LABEL_RUN, Executor
from orchestrator.hashing import HashMemo
from orchestrator.imageplan import ImageForecast
from orchestrator.objectstore import ObjectStore
from orchestrator.spec import SWARM_NEEDS_STORE, Pipeline
from orchestrator.swarm_executor import LABEL_ROLE, TERMINAL, UNENFORCED, SwarmExecutor, SwarmSettings

AGENT_BINARIES = ("/bin/busybox", "/usr/bin/rclone", "/usr/bin/b3sum")
AGENT_LIBS = ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libm.so.6",
              "/lib/x86_64-linux-gnu/libgcc_s.so.1")  # rclone's and b3sum's (Debian builds them dynamically
# against glibc); busybox-static needs none


def sandbox_warnings(pipeline: Pipeline, stages: Iterable[str]) -> list[str]:
    """One line a stage: what its sandbox lacks on Swarm (Engine 20.10), never silent."""
    return [f"{name}: on swarm the stage runs without {', '.join(UNENFORCED)}" for name in stages]


class SwarmBackend:
    def __init__(self, pipeline: Pipeline, host: str | None = None) -> None:
        config = pipeline.executor
        assert config.registry is not None, "spec.Executor checks it for swarm"
        store = pipeline.handoff_store
        if store is None or store.url is None:  # --executor swarm on a file that validated as local
            raise pipeline.error("executor.store", SWARM_NEEDS_STORE, at="executor")
        self._config = config.model_copy(update={"store": store})
        # the push step leaves outputs in the store's blobs/: the remote cache's when it is the hand-off store (the
        # default), so they come to this host only as --fetch says; from a store of its own, they all come
        self.stores_outputs = pipeline.remote is not None and store.url == pipeline.remote.url
        self._client = connect(host or config.host)
        self._api: Any = self._client.api  # the SDK's low-level calls are untyped
        self._check_manager()
        self._store = ObjectStore(store.url, store.endpoint)
        self._refs: dict[str, str] = {}
        self._stage_constraints = {n: s.constraints for n, s in pipeline.stages.items() if s.constraints}
        self._agent: str | None = None

    def _check_manager(self) -> None:
        try:
            swarm = self._client.info().get("Swarm") or {}
        except ENGINE_FAULTS as e:
            raise EngineError(f"swarm manager did not answer: {short_reason(e)}") from e
        if not swarm.get("ControlAvailable"):
            raise EngineError(f"{self._api.base_url} is not a swarm manager (executor.host)")

    def executor(self) -> Executor:
        store = self._config.store
        assert store is not None
        access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise EngineError("the swarm's hand-off agent needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(given to its tasks as a swarm secret)")
        self._store.check()
        settings = SwarmSettings(
            agent_image=self.agent_image(),
            bucket_prefix=f"{self._store.bucket}/{self._store.prefix}",
            rclone_config=handoff.rclone_config(store.node_endpoint or store.endpoint or "", access, secret),
            handoff_dir=self._config.handoff_dir,
            constraints=self._config.constraints,
            pending_timeout_s=self._config.pending_timeout,
            stage_constraints=self._stage_constraints,
        )
        return SwarmExecutor(self._client, self._store, settings, self._refs)

    def forecast_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                        hash_memo: HashMemo | None) -> dict[str, ImageForecast]:
        from orchestrator import images

        return images.forecast_images(pipeline, stages, self._client, _swarm_memo(memo_path), hash_memo)

    def resolve_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                       on_event: Callable[[Event], None], hash_memo: HashMemo | None) -> dict[str, str]:
        from orchestrator import images

        stages = list(stages)
        for line in sandbox_warnings(pipeline, stages):
            on_event(Notice(line))
        ids = images.resolve_images(pipeline, stages, self._client, _swarm_memo(memo_path), on_event, hash_memo,
                                    seed_cache=True)
        for name, image_id in ids.items():
            if image_id not in self._refs:
                self._refs[image_id] = self.publish(image_id, f"pipe/{name}")
        return ids

    def publish(self, image: str, repo: str) -> str:
        """Push `image` (on the manager) to the registry; its registry/repo@sha256:... reference."""
        registry = self._config.registry
        try:
            found = self._client.images.get(image)
            tag = str(found.id).removeprefix("sha256:")[:16]
            full = f"{registry}/{repo}"
            found.tag(full, tag)
            for event in self._client.images.push(full, tag, stream=True, decode=True):
                if "error" in event:
                    raise EngineError(f"push of {full}:{tag} to {registry} failed: {event['error']}")
            digest = self._client.images.get_registry_data(f"{full}:{tag}").id
        except ENGINE_FAULTS as e:
            raise EngineError(f"cannot publish {image} to {registry}: {short_reason(e)}") from e
        return f"{full}@{digest}"

    def agent_image(self) -> str:
        """The hand-off agent's registry/pipe/agent@sha256 reference, made and pushed when the registry lacks it."""
        if self._agent is not None:
            return self._agent
        missing = [p for p in (*AGENT_BINARIES, *AGENT_LIBS) if not Path(p).exists()]
        if missing:
            raise EngineError(f"the hand-off agent image needs {', '.join(missing)} (Debian: busybox-static, "
                              "rclone, b3sum)")
        version = hashlib.sha256(b"".join(Path(p).read_bytes()[:1 << 20] for p in AGENT_BINARIES)).hexdigest()[:12]
        name = f"{self._config.registry}/pipe/agent"
        try:
            try:
                self._agent = f"{name}@{self._client.images.get_registry_data(f'{name}:{version}').id}"
                return self._agent
            except docker.errors.APIError:
                pass  # not there yet
            with tempfile.TemporaryDirectory(prefix="pipe-agent-") as tmp:
                tar = Path(tmp) / "rootfs.tar"
                _agent_rootfs(tar)
                self._api.import_image_from_file(
                    str(tar), repository=name, tag=version,
                    changes=["ENV PATH=/bin:/usr/bin", 'CMD ["/bin/sh"]', f"LABEL {LABEL_MANAGED}=1"])
            self._agent = self.publish(f"{name}:{version}", "pipe/agent")
        except ENGINE_FAULTS as e:
            raise EngineError(f"cannot make the hand-off agent image: {short_reason(e)}") from e
        return self._agent

    def gpu_problem(self) -> str | None:
        """GPUs on a swarm are generic resources the nodes advertise ("gpu")."""
        try:
            nodes = self._api.nodes()
        except ENGINE_FAULTS as e:
            raise EngineError(f"swarm manager did not answer: {short_reason(e)}") from e
        for node in nodes:
            for res in ((node.get("Description") or {}).get("Resources") or {}).get("GenericResources") or ():
                kind = (res.get("DiscreteResourceSpec") or res.get("NamedResourceSpec") or {}).get("Kind")
                if kind == "gpu":
                    return None
        return "no swarm node advertises a 'gpu' generic resource (dockerd node-generic-resources)"

    def capacity(self) -> tuple[float, int]:
        """The cluster's CPUs and memory (nodes on one test host each report the host's own)."""
        nodes = [n for n in self._api.nodes() if (n.get("Status") or {}).get("State") == "ready"]
        res = [(n.get("Description") or {}).get("Resources") or {} for n in nodes]
        return sum(r.get("NanoCPUs", 0) for r in res) / 1e9, sum(r.get("MemoryBytes", 0) for r in res)

    def sweep(self, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
        """Remove the services, secrets and networks of dead runs of `owner`, then their hand-off folders on
        every node (one agent task per node)."""
        dead: set[str] = set()
        try:
            for kind, listing, remove in (
                ("service", self._api.services, self._api.remove_service),
                ("secret", self._api.secrets, self._api.remove_secret),
                ("network", self._api.networks, self._api.remove_network),
            ):
                for row in listing(filters={"label": [f"{LABEL_PIPELINE}={owner}"]}):
                    labels = row.get("Spec", {}).get("Labels") or row.get("Labels") or {}
                    run_id = str(labels.get(LABEL_RUN, ""))
                    if kind == "service" and labels.get(LABEL_ROLE) == "clean" and self._waits_for_node(row):
                        continue  # a lost node's cleanup, still waiting for that node to come back
                    if is_alive(run_id) is not True:
                        dead.add(run_id)
                        try:
                            remove(str(row.get("ID") or row.get("Id")))
                        except docker.errors.APIError:
                            pass  # in use for a moment longer: the next sweep
            if dead:
                self._sweep_nodes(sorted(dead))
        except ENGINE_FAULTS as e:
            raise EngineError(f"swarm manager did not answer: {short_reason(e)}") from e
        return sorted(dead)

    def _waits_for_node(self, service: dict[str, Any]) -> bool:
        """Whether a clean service's task has not run yet because its node is down."""
        for task in self._api.tasks(filters={"service": str(service.get("ID"))}):
            if (task.get("Status") or {}).get("State") in TERMINAL:
                continue
            with suppress(docker.errors.NotFound):
                if (self._api.inspect_node(task.get("NodeID") or "").get("Status") or {}).get("State") == "down":
                    return True
        return False

    def _sweep_nodes(self, run_ids: list[str]) -> None:
        """One agent task on every node removes the dead runs' hand-off folders (a global service, run once)."""
        import time

        from docker.types import ContainerSpec as SwarmContainerSpec
        from docker.types import Mount, RestartPolicy, ServiceMode, TaskTemplate

        container = SwarmContainerSpec(self.agent_image(), command=["sh", "-c", handoff.sweep_script(run_ids)],
                                       mounts=[Mount(handoff.AGENT_ROOT, self._config.handoff_dir, type="bind")])
        template = TaskTemplate(container, restart_policy=RestartPolicy(condition="none"))
        service = self._api.create_service(template, mode=ServiceMode("global"),
                                                  labels={LABEL_MANAGED: "1"})["ID"]
        try:
            nodes = len([n for n in self._api.nodes() if (n.get("Status") or {}).get("State") == "ready"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                tasks = self._api.tasks(filters={"service": service})
                done = [t for t in tasks if (t.get("Status") or {}).get("State") in ("complete", "failed",
                                                                                     "rejected", "shutdown")]
                if len(done) >= nodes:
                    return
                time.sleep(0.2)
        finally:
            self._api.remove_service(service)


def _swarm_memo(memo_path: Path) -> Path:
    return memo_path.with_name(memo_path.stem + "-swarm" + memo_path.suffix)


def _agent_rootfs(dest: Path) -> None:
    """A root file system of busybox (its applets as links), rclone, b3sum and their libraries."""
    with tempfile.TemporaryDirectory(prefix="pipe-agent-root-") as tmp:
        root = Path(tmp)
        for folder in ("bin", "usr/bin", "tmp", "etc", "lib/x86_64-linux-gnu", "lib64"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        for path in (*AGENT_BINARIES, *AGENT_LIBS):
            shutil.copy2(path, root / path.lstrip("/"))
        import subprocess

        applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc/passwd").write_text("root:x:0:0:root:/tmp:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "tmp").chmod(0o1777)
        with tarfile.open(dest, "w") as tar:
            tar.add(root, arcname=".")
