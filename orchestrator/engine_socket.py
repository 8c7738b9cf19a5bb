"""The engine read over its unix socket with the standard library: `pipe status`, a local dry run and a no-op
`pipe run` check image ids and look for a dead run's containers without importing the Docker SDK (docker,
requests, urllib3: about a fifth of their start-up).

Read-only: `GET /images/json` once (imageplan.ImageIndex), then `GET /images/{ref}/json` for a reference the list
does not name, the very calls the SDK's `images.get` makes; `GET /containers/json` with label filters. Only for an
engine on a unix socket (DOCKER_HOST unset or `unix://...`); a TCP or SSH engine, with its TLS settings, is the
SDK's (docker_executor.connect). Knows nothing of stages, caches or history.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import quote

from orchestrator.errors import EngineError, ImageError
from orchestrator.imageplan import ImageIndex, base_ids
from orchestrator.spec import Build, Pipeline

DEFAULT_SOCKET = "/var/run/docker.sock"
TIMEOUT_S = 5.0


def socket_path(docker_url: str | None = None, environ: dict[str, str] | os._Environ[str] | None = None
                ) -> str | None:
    """The engine's unix socket as `--docker-url`, else DOCKER_HOST, else the default name it; None for another
    kind of address (tcp://, ssh://), which only the SDK speaks."""
    env = os.environ if environ is None else environ
    address = docker_url or env.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    if address.startswith("unix://"):
        return address.removeprefix("unix://") or None
    if address.startswith("/"):
        return address
    return None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SocketEngine:
    """One keep-alive connection to the engine's socket; `get` answers parsed JSON, or None for a 404."""

    def __init__(self, path: str, timeout_s: float = TIMEOUT_S) -> None:
        self._path = path
        self._conn = _UnixConnection(path, timeout_s)

    def get(self, url: str) -> Any:
        try:
            self._conn.request("GET", url, headers={"Host": "docker"})
            response = self._conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise EngineError(f"docker engine unreachable at unix://{self._path}: {reason}; is the Docker engine "
                              "(dockerd) running, and may you use its socket?") from e
        if response.status == 404:
            return None
        if response.status >= 400:
            try:
                message = json.loads(body).get("message") or body.decode(errors="replace")
            except (ValueError, AttributeError):
                message = body.decode(errors="replace")
            raise ImageError(f"docker engine refused an image request: {' '.join(str(message).split())}")
        return json.loads(body)

    def close(self) -> None:
        self._conn.close()


class SocketView:
    """imageplan.EngineView over SocketEngine: the image list once, an inspect per reference it does not name.
    Constructing it lists the images, so an engine that does not answer raises EngineError here."""

    def __init__(self, engine: SocketEngine) -> None:
        self._engine = engine
        self._index = ImageIndex(engine.get("/images/json") or [])
        self._ids: dict[str, str | None] = {}
        self._exists: dict[str, bool] = {}

    def base_ids(self, pipeline: Pipeline, name: str, build: Build) -> dict[str, str]:
        return base_ids(pipeline, name, build, self.local_id)

    def local_id(self, ref: str) -> str | None:
        if ref not in self._ids:
            found = self._index.local_id(ref)
            self._ids[ref] = found if found is not None else self._inspect(ref)
        return self._ids[ref]

    def exists(self, image_id: str) -> bool:
        if image_id not in self._exists:
            self._exists[image_id] = self._index.has(image_id) or self._inspect(image_id) is not None
        return self._exists[image_id]

    def _inspect(self, ref: str) -> str | None:
        found = self._engine.get(f"/images/{quote(ref, safe='/:')}/json")
        return str(found["Id"]) if isinstance(found, dict) and found.get("Id") else None


def labelled_containers(docker_url: str | None, labels: list[str]) -> list[dict[str, Any]] | None:
    """Every container (running or not) that carries all of `labels` ("key" or "key=value"), as the engine
    lists them; None when the engine is not on a unix socket (the caller then asks the SDK)."""
    path = socket_path(docker_url)
    if path is None:
        return None
    engine = SocketEngine(path)
    try:
        filters = quote(json.dumps({"label": labels}))
        return list(engine.get(f"/containers/json?all=1&filters={filters}") or [])
    finally:
        engine.close()


def connect_view(docker_url: str | None = None) -> SocketView | None:
    """A SocketView of the engine named by `docker_url`/DOCKER_HOST when it is on a unix socket; None when the
    address is another kind (the caller then uses the SDK). EngineError when the socket does not answer."""
    path = socket_path(docker_url)
    if path is None:
        return None
    return SocketView(SocketEngine(path))
