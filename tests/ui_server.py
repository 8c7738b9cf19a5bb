"""A `pipe ui` server in a thread of the test, on loopback, and plain HTTP requests to it."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator import api, webui


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@contextmanager
def serve(path: Path, host: str = "127.0.0.1", token: str | None = None) -> Iterator[webui.UIServer]:
    server = webui.make_server(api.Target(path), host, 0, token)
    thread = threading.Thread(target=server.serve_forever, name="pipe-ui-test", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def request(server: webui.UIServer, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            host: str = "127.0.0.1") -> Answer:
    connection = http.client.HTTPConnection(host, server.server_address[1], timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()
