"""The pipe-owned reverse proxy in front of the serving replicas: nginx's configuration, as pure text.

nginx (Debian's nginx-light, in its own container) holds the published port; a swap rewrites this file and sends
SIGHUP, which nginx documents as a graceful reload: the master keeps the listening socket, starts workers with
the new upstream, and the old workers finish their requests before they exit. So no connection is refused and
none in flight is dropped. The first line records what the file routes to, so a later `pipe serve` (after a
SIGKILL) knows which replicas are live without asking history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROXY_IMAGE = "pipe-serve-proxy:1"  # built once from PROXY_DOCKERFILE, on the engine's debian:bookworm-slim
PROXY_PORT = 8080  # inside the proxy container; the engine publishes it at `serve.publish`
CONF_NAME = "nginx.conf"
CONF_TARGET = "/etc/pipe-proxy"
PROXY_COMMAND = ("nginx", "-e", "/dev/stderr", "-c", f"{CONF_TARGET}/{CONF_NAME}", "-g", "daemon off;")
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
        "worker_processes 1;\n"
        "pid /tmp/nginx.pid;\n"
        "error_log /dev/stderr warn;\n"
        f"worker_shutdown_timeout {DRAIN_S}s;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    access_log off;\n"
        "    client_body_temp_path /tmp/client_body;\n"
        "    proxy_temp_path /tmp/proxy;\n"
        "    fastcgi_temp_path /tmp/fastcgi;\n"
        "    uwsgi_temp_path /tmp/uwsgi;\n"
        "    scgi_temp_path /tmp/scgi;\n"
        "    client_max_body_size 16m;\n"
        f"{upstream}"
        "    server {\n"
        f"        listen {PROXY_PORT};\n"
        f"{location}"
        "    }\n"
        "}\n"
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
    tmp = folder / f".{CONF_NAME}.tmp"
    tmp.write_text(render(routing), encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(folder / CONF_NAME)


def read(folder: Path) -> Routing:
    try:
        return parse((folder / CONF_NAME).read_text(encoding="utf-8"))
    except OSError:
        return EMPTY
