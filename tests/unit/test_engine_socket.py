"""The image list as EngineView answers (imageplan.ImageIndex, pure logic), and engine_socket's stdlib reader
against the real engine: it must answer as the Docker SDK does, with one list call for any number of refs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator import engine_socket
from orchestrator.errors import EngineError
from orchestrator.imageplan import ImageIndex
from tests.conftest import BUSYBOX

LISTING = [
    {"Id": "sha256:aaa", "RepoTags": ["busybox:latest", "localhost:5000/team/app:1.2"],
     "RepoDigests": ["busybox@sha256:ddd"]},
    {"Id": "sha256:bbb", "RepoTags": ["<none>:<none>"], "RepoDigests": None},
    {"Id": "sha256:ccc", "RepoTags": ["localhost:5000/team/app:latest"]},
]


def test_the_index_answers_tags_digests_and_ids_and_leaves_the_rest_to_the_engine() -> None:
    index = ImageIndex(LISTING)
    assert index.local_id("busybox:latest") == "sha256:aaa"
    assert index.local_id("busybox") == "sha256:aaa"  # no tag: latest
    assert index.local_id("busybox@sha256:ddd") == "sha256:aaa"
    assert index.local_id("localhost:5000/team/app:1.2") == "sha256:aaa"
    assert index.local_id("localhost:5000/team/app") == "sha256:ccc"  # a port is not a tag
    assert index.local_id("sha256:bbb") == "sha256:bbb"
    for unknown in ("busybox:1.36", "docker.io/library/busybox", "aaa", "<none>:<none>"):
        assert index.local_id(unknown) is None  # not an answer: the view inspects that reference
    assert index.has("sha256:bbb") and not index.has("sha256:zzz")


def test_socket_path_is_a_unix_address_only() -> None:
    assert engine_socket.socket_path(None, {}) == "/var/run/docker.sock"
    assert engine_socket.socket_path(None, {"DOCKER_HOST": "unix:///tmp/d.sock"}) == "/tmp/d.sock"
    assert engine_socket.socket_path("unix:///x.sock", {"DOCKER_HOST": "tcp://h:2375"}) == "/x.sock"
    assert engine_socket.socket_path(None, {"DOCKER_HOST": "tcp://h:2376"}) is None
    assert engine_socket.socket_path(None, {"DOCKER_HOST": "ssh://me@h"}) is None


def test_a_socket_nobody_listens_on_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unreachable at unix://.*missing.sock"):
        engine_socket.connect_view(f"unix://{tmp_path / 'missing.sock'}")


def test_the_socket_view_answers_as_the_sdk_with_one_list_call(docker_client: Any) -> None:
    path = engine_socket.socket_path()
    if path is None:
        pytest.skip("the engine is not on a unix socket")
    calls: list[str] = []
    engine = engine_socket.SocketEngine(path)
    real_get = engine.get

    def counting(url: str) -> Any:
        calls.append(url)
        return real_get(url)

    engine.get = counting  # type: ignore[method-assign]
    view = engine_socket.SocketView(engine)
    busybox = docker_client.images.get(BUSYBOX)
    for _ in range(100):
        assert view.local_id(BUSYBOX) == busybox.id
    assert view.exists(busybox.id)
    assert calls == ["/images/json"]
    assert view.local_id(busybox.id[len("sha256:"):][:12]) == busybox.id  # an id prefix: inspected, as the SDK
    assert view.local_id("pipe-no-such-image:never") is None
    assert not view.exists("sha256:" + "0" * 64)
    assert len(calls) == 4
    engine.close()
