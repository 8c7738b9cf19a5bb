"""The pipe-owned reverse proxy in front of the serving replicas: nginx's configuration, as pure text.

Two nginx instances (Debian's nginx-light) in one container. The *front* holds the published port and the
clients' connections and is never reloaded: a reloading nginx closes its old workers' idle keep-alive
connections, and a request a client writes on one at that instant is lost (bench/SERVE_RESULTS.md measured it).
The front passes each request on a fresh connection over a unix socket to the *back*, which routes to the
replicas. A swap rewrites the back's file and reloads it gracefully (`nginx -s reload`: the master keeps the
listening socket, starts workers with the new upstream, and the old workers finish their requests before they
exit); the front's connections to it are never idle, so none is closed under a request, no connection is refused
and none in flight is dropped. The back's first line records what it routes to, so a later `pipe serve` (after a
SIGKILL) knows which replicas are live without asking history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROXY_IMAGE = "pipe-serve-proxy:1"  # built once from PROXY_DOCKERFILE, on the engine's debian:bookworm-slim
PROXY_PORT = 8080  # inside the proxy container; the engine publishes it at `serve.publish`
CONF_NAME = "nginx.conf"  # the back's: the routing, rewritten by every swap
FRONT_NAME = "front.conf"  # the front's: fixed
CONF_TARGET = "/etc/pipe-proxy"
BACK_SOCKET = "/tmp/pipe-back.sock"
# the back starts as a daemon, the front stays in the foreground (the container's process, stopped with it)
PROXY_COMMAND = ("/bin/sh", "-c", (f"nginx -e /dev/stderr -c {CONF_TARGET}/{CONF_NAME} && "
                                   f"exec nginx -e /dev/stderr -c {CONF_TARGET}/{FRONT_NAME} -g 'daemon off;'"))
RELOAD_COMMAND = ("nginx", "-e", "/dev/stderr", "-c", f"{CONF_TARGET}/{CONF_NAME}", "-s", "reload")
HEADER = "# pipe-serve "
PROXY_USER = "65534:65534"  # nobody, whoever runs pipe: as root without capabilities nginx fails to chown
DRAIN_S = 30  # nginx's worker_shutdown_timeout: an old worker closes what is left after this

PROXY_DOCKERFILE = """\
FROM debian:bookworm-slim
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \\
 && rm -rf /var/lib/apt/lists/*
LABEL dev.pipe.managed=1
CMD ["nginx", "-g", "daemon off;"]
"""


@dataclass(frozen=True)
class Routing:
    """What the proxy sends traffic to: the replicas (container id, address) of one run's model."""

    run_id: str | None
    digest: str | None
    replicas: tuple[tuple[str, str], ...]  # (container id, "ip:port")

    def to_json(self) -> dict[str, object]:
        return {"run_id": self.run_id, "digest": self.digest, "replicas": [list(r) for r in self.replicas]}


EMPTY = Routing(None, None, ())


def render(routing: Routing) -> str:
    """nginx.conf for `routing`; with no replica every request is answered 503 (never refused)."""
    if routing.replicas:
        servers = "".join(f"        server {address} max_fails=0;\n" for _, address in routing.replicas)
        upstream = f"    upstream model {{\n{servers}        keepalive 16;\n    }}\n"
        location = ("        location / {\n"
                    "            proxy_pass http://model;\n"
                    "            proxy_http_version 1.1;\n"
                    "            proxy_set_header Connection \"\";\n"
                    "            proxy_next_upstream error timeout http_502 http_503;\n"
                    "            proxy_connect_timeout 2s;\n"
                    "            proxy_read_timeout 60s;\n"
                    "        }\n")
    else:
        upstream = ""
        location = "        location / {\n            return 503 \"no model is served\\n\";\n        }\n"
    return (
        f"{HEADER}{json.dumps(routing.to_json(), sort_keys=True)}\n"
        + _common("back", f"worker_shutdown_timeout {DRAIN_S}s;\n")
        + f"{upstream}"
        "    server {\n"
        f"        listen unix:{BACK_SOCKET};\n"
        f"{location}"
        "    }\n"
        "}\n"
    )


def render_front() -> str:
    """The front's nginx.conf: the published port, each request passed on a new connection to the back (no
    upstream keep-alive, so nothing between them is ever idle when the back reloads)."""
    return (
        "# pipe-serve front: holds the clients' connections; never reloaded\n"
        + _common("front", "")
        + "    server {\n"
        f"        listen {PROXY_PORT};\n"
        "        location / {\n"
        f"            proxy_pass http://unix:{BACK_SOCKET}:;\n"
        "            proxy_set_header Host $host;\n"
        "            proxy_connect_timeout 2s;\n"
        "            proxy_read_timeout 60s;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


def _common(name: str, extra: str) -> str:
    return (
        "worker_processes 1;\n"
        f"pid /tmp/nginx-{name}.pid;\n"
        "error_log /dev/stderr warn;\n"
        f"{extra}"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    access_log off;\n"
        f"    client_body_temp_path /tmp/{name}-client_body;\n"
        f"    proxy_temp_path /tmp/{name}-proxy;\n"
        f"    fastcgi_temp_path /tmp/{name}-fastcgi;\n"
        f"    uwsgi_temp_path /tmp/{name}-uwsgi;\n"
        f"    scgi_temp_path /tmp/{name}-scgi;\n"
        "    client_max_body_size 16m;\n"
    )


def parse(text: str) -> Routing:
    """The routing a configuration written by render() records; EMPTY for anything else."""
    first = text.partition("\n")[0]
    if not first.startswith(HEADER):
        return EMPTY
    try:
        data = json.loads(first.removeprefix(HEADER))
        replicas = tuple((str(cid), str(address)) for cid, address in data["replicas"])
        return Routing(data.get("run_id"), data.get("digest"), replicas)
    except (ValueError, KeyError, TypeError):
        return EMPTY


def write(folder: Path, routing: Routing) -> None:
    """Replace the configuration atomically (temporary name, then rename): nginx never reads half a file. The
    folder is mounted, not the file, so the proxy sees the renamed file."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # the proxy runs as nobody; runs/ above it stays 0700 (a bind mount skips the parents)
    for name, text in ((FRONT_NAME, render_front()), (CONF_NAME, render(routing))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        tmp.replace(folder / name)


def read(folder: Path) -> Routing:
    try:
        return parse((folder / CONF_NAME).read_text(encoding="utf-8"))
    except OSError:
        return EMPTY
