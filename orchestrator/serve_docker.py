"""The serving containers on one engine: the internal network, the nginx proxy, the replicas, health, drain.

Knows nothing of history or pipelines: serving.py says what to start and when to switch. Every container is
created from a ContainerSpec through docker_executor.host_kwargs, so the sandbox is the stages' one (no
capabilities, no-new-privileges, read-only root, capped /tmp, non-root, pids, memory and cpu caps); what is
added here is the network: a replica is attached only to an internal network (no route out of the host), and
only the proxy also sits on the default bridge, where the engine publishes its port.

Serving containers carry their own owner label (LABEL_SERVE_OWNER), not LABEL_PIPELINE, so the orphan sweep of
`pipe run` (which removes containers of dead runs) never touches them.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal, TypeVar

import docker
import docker.errors
from docker.models.containers import Container

from orchestrator.docker_executor import ENGINE_FAULTS, host_kwargs, short_reason
from orchestrator.errors import EngineError, ImageError
from orchestrator.executor import LABEL_PREFIX, ContainerSpec
from orchestrator.serve_proxy import (
    CONF_NAME,
    PROXY_COMMAND,
    PROXY_DOCKERFILE,
    PROXY_IMAGE,
    PROXY_PORT,
    RELOAD_COMMAND,
)

LABEL_SERVE_OWNER = f"{LABEL_PREFIX}.serve.owner"  # the pipeline's state dir, resolved
LABEL_SERVE_ROLE = f"{LABEL_PREFIX}.serve.role"  # "proxy" | "replica"
LABEL_SERVE_RUN = f"{LABEL_PREFIX}.serve.run"
LABEL_SERVE_DIGEST = f"{LABEL_PREFIX}.serve.digest"
STOP_GRACE_S = 10
T = TypeVar("T")


@dataclass(frozen=True)
class Replica:
    container_id: str
    name: str
    run_id: str
    digest: str
    status: str  # the engine's: running, restarting, exited, ...
    restarts: int
    address: str | None  # "ip:port" on the internal network, while running


@dataclass(frozen=True)
class Found:
    """What of one pipeline's serving exists on the engine (found by label: no pipe process needed)."""

    proxy_id: str | None
    proxy_status: str | None
    replicas: tuple[Replica, ...]
    network: str | None
    proxy_current: bool = True  # False: a proxy started by an older pipe, with another command (replace it)


def slug(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:10]


class ServeEngine:
    def __init__(self, client: docker.DockerClient, owner: str) -> None:
        self._client, self._owner = client, owner
        self.network_name = f"pipe-serve-{slug(owner)}"
        self.proxy_name = f"pipe-serve-{slug(owner)}-proxy"

    # --- finding -------------------------------------------------------------------------------------------

    def find(self) -> Found:
        def look() -> Found:
            proxy_id = proxy_status = None
            current = True
            replicas = []
            for c in self._client.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={self._owner}"}):
                labels = c.labels
                if labels.get(LABEL_SERVE_ROLE) == "proxy":
                    proxy_id, proxy_status = str(c.id), c.status
                    current = (c.attrs.get("Config") or {}).get("Cmd") == list(PROXY_COMMAND)
                else:
                    replicas.append(self._replica(c, port=int(labels.get(f"{LABEL_PREFIX}.serve.port", "0"))))
            nets = self._client.networks.list(names=[self.network_name])
            return Found(proxy_id, proxy_status, tuple(sorted(replicas, key=lambda r: r.name)),
                         nets[0].name if nets else None, current)
        return _engine(look)

    def _replica(self, c: Container, port: int) -> Replica:
        networks = c.attrs.get("NetworkSettings", {}).get("Networks") or {}
        ip = (networks.get(self.network_name) or {}).get("IPAddress") or None
        return Replica(container_id=str(c.id), name=c.name or "", run_id=c.labels.get(LABEL_SERVE_RUN, ""),
                       digest=c.labels.get(LABEL_SERVE_DIGEST, ""), status=c.status,
                       restarts=int(c.attrs.get("RestartCount") or 0),
                       address=f"{ip}:{port}" if ip and c.status == "running" else None)

    def replica(self, container_id: str) -> Replica | None:
        def look() -> Replica | None:
            try:
                c = self._client.containers.get(container_id)
            except docker.errors.NotFound:
                return None
            return self._replica(c, port=int(c.labels.get(f"{LABEL_PREFIX}.serve.port", "0")))
        return _engine(look)

    # --- starting ------------------------------------------------------------------------------------------

    def ensure_network(self) -> None:
        def make() -> None:
            if not self._client.networks.list(names=[self.network_name]):
                self._client.networks.create(self.network_name, driver="bridge", internal=True,
                                             labels={LABEL_SERVE_OWNER: self._owner})
        _engine(make)

    def proxy_image(self, on_output: Callable[[str], None] = lambda _: None) -> str:
        """The proxy's image id, built once from serve_proxy.PROXY_DOCKERFILE (Debian's nginx-light)."""
        def get() -> str:
            try:
                return str(self._client.images.get(PROXY_IMAGE).id)
            except docker.errors.ImageNotFound:
                pass
            try:
                image, logs = self._client.images.build(fileobj=io.BytesIO(PROXY_DOCKERFILE.encode()),
                                                        tag=PROXY_IMAGE, rm=True, forcerm=True)
            except docker.errors.BuildError as e:
                raise ImageError(f"the serving proxy's image ({PROXY_IMAGE}) failed to build: {e.msg}") from e
            for chunk in logs:
                if isinstance(chunk, dict) and chunk.get("stream"):
                    on_output(str(chunk["stream"]))
            return str(image.id)
        return _engine(get)

    def start_proxy(self, spec: ContainerSpec, host: str, port: int) -> str:
        """The proxy on the default bridge (published at host:port) and on the internal network."""
        kwargs = host_kwargs(spec)
        kwargs["labels"] = {**kwargs["labels"], LABEL_SERVE_OWNER: self._owner, LABEL_SERVE_ROLE: "proxy"}
        kwargs["ports"] = {f"{PROXY_PORT}/tcp": (host, port)}
        kwargs["restart_policy"] = {"Name": "unless-stopped"}

        def start() -> str:
            c = self._client.containers.create(spec.image_id, name=self.proxy_name, detach=True, **kwargs)
            try:
                self._client.networks.get(self.network_name).connect(c)
                c.start()
            except BaseException:
                with suppress(*ENGINE_FAULTS):
                    c.remove(force=True)
                raise
            return str(c.id)
        return _engine(start, f"the serving proxy could not start on {host}:{port}")

    def start_replica(self, spec: ContainerSpec, run_id: str, digest: str, port: int, restarts: int) -> Replica:
        """One replica on the internal network only (spec.network must be True: host_kwargs then leaves the
        network to us, and it is this internal one, not the bridge)."""
        assert spec.network, "a replica joins the internal network, never network_mode=none nor the bridge"
        kwargs = host_kwargs(spec)
        kwargs["labels"] = {**kwargs["labels"], LABEL_SERVE_OWNER: self._owner, LABEL_SERVE_ROLE: "replica",
                            LABEL_SERVE_RUN: run_id, LABEL_SERVE_DIGEST: digest, f"{LABEL_PREFIX}.serve.port": str(port)}
        kwargs["network"] = self.network_name
        kwargs["restart_policy"] = {"Name": "on-failure", "MaximumRetryCount": restarts}
        name = f"pipe-serve-{slug(self._owner)}-{run_id[-4:]}-{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:6]}"

        def start() -> Replica:
            c = self._client.containers.create(spec.image_id, name=name, detach=True, **kwargs)
            try:
                c.start()
                c.reload()
            except BaseException:
                with suppress(*ENGINE_FAULTS):
                    c.remove(force=True)
                raise
            return self._replica(c, port)
        return _engine(start, "the serving replica could not start")

    # --- health, switch, drain -----------------------------------------------------------------------------

    def reload_proxy(self) -> None:
        """The back nginx's graceful reload (serve_proxy): new workers take the new upstream, old ones finish
        their requests; the front, which holds the clients' connections, is not touched."""
        def reload() -> None:
            code, out = self._client.containers.get(self.proxy_name).exec_run(list(RELOAD_COMMAND))
            if code != 0:
                said = out.decode(errors="replace").strip() if isinstance(out, bytes) else ""
                raise EngineError(f"the serving proxy did not reload: {said}")
        _engine(reload, "the serving proxy did not reload")

    def workers(self) -> dict[str, bool]:
        """The back nginx's worker pids -> whether each is shutting down (an old worker finishing requests)."""
        def list_workers() -> dict[str, bool]:
            top = self._client.api.top(self.proxy_name, ps_args="-o pid,ppid,args")
            rows = [(str(row[0]), str(row[1]), " ".join(row[2:])) for row in top.get("Processes") or ()]
            masters = {pid for pid, _, args in rows if "master process" in args and CONF_NAME in args}
            return {pid: "shutting down" in args for pid, ppid, args in rows
                    if ppid in masters and "worker process" in args}
        return _engine(list_workers)

    def reloaded(self, before: set[str]) -> bool:
        """Whether a reload finished: workers run, none of them from before it, and no old one is left."""
        now = self.workers()
        return bool(now) and not (set(now) & before) and not any(now.values())

    def remove(self, container_id: str, grace_s: float = STOP_GRACE_S) -> None:
        def rm() -> None:
            with suppress(docker.errors.NotFound):
                c = self._client.containers.get(container_id)
                with suppress(docker.errors.APIError):
                    c.stop(timeout=int(grace_s))
                c.remove(force=True)
        _engine(rm)

    def remove_network(self) -> None:
        def rm() -> None:
            for net in self._client.networks.list(names=[self.network_name]):
                with suppress(docker.errors.NotFound):
                    net.remove()
        _engine(rm)

    def logs(self, container_id: str, follow: bool = False, tail: Literal["all"] | int = "all") -> Iterator[bytes]:
        try:
            stream = self._client.api.logs(container_id, stream=True, follow=follow, tail=tail)
            yield from stream
        except docker.errors.NotFound:
            return
        except ENGINE_FAULTS as e:
            raise EngineError(f"docker engine unreachable: {short_reason(e)}") from e


def http_get(address: str, path: str, timeout_s: float) -> tuple[int, bytes] | None:
    """(status, body) of GET http://address/path, or None when it cannot be reached in time."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read(1024 * 1024)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def healthy(address: str | None, path: str, timeout_s: float) -> bool:
    if address is None:
        return False
    answer = http_get(address, path, timeout_s)
    return answer is not None and 200 <= answer[0] < 300


def _engine(action: Callable[[], T], doing: str = "docker engine unreachable") -> T:
    try:
        return action()
    except docker.errors.APIError as e:
        raise EngineError(f"{doing}: {short_reason(e)}") from e
    except ENGINE_FAULTS as e:
        raise EngineError(f"{doing}: {short_reason(e)}") from e
