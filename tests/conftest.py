"""Shared fixtures: the Docker engine (skipped only where none runs, never in CI), leftover checks, builders."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

BUSYBOX = "pipe-busybox:latest"  # made by scripts/base-images.sh from Debian's busybox-static
REQUIRE_DOCKER = bool(os.environ.get("PIPE_REQUIRE_DOCKER"))  # set by .ci/run: there, nothing may skip
_skipped_tests: list[str] = []


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        if REQUIRE_DOCKER:  # set by .ci/run: there, absence is a failure
            pytest.fail(f"Docker engine required but unreachable: {e}")
        pytest.skip("no Docker engine")
    try:
        client.images.get(BUSYBOX)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{BUSYBOX} is missing: run scripts/base-images.sh")
    yield client
    client.close()


def pipe_containers(client: Any, owner: str) -> list[Any]:
    """Containers that pipe started for the pipeline whose state dir is (under) `owner`."""
    from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE

    return [
        c
        for c in client.containers.list(all=True, ignore_removed=True, filters={"label": LABEL_MANAGED})
        if c.labels.get(LABEL_PIPELINE, "").startswith(owner)
    ]


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll until condition() is truthy, with a deadline (no bare sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def docker(request: pytest.FixtureRequest, docker_client: Any, tmp_path: Path) -> Iterator[Any]:
    """The engine, for a test whose pipe containers live under tmp_path; fails the test if any is left behind."""
    yield docker_client
    leftovers = pipe_containers(docker_client, str(tmp_path))
    for c in leftovers:
        c.remove(force=True)
    assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"


@pytest.fixture
def make_pipeline(tmp_path: Path) -> Callable[..., Path]:
    """Write pipeline.yaml (from a dict or raw text) and its input files under tmp_path/project."""

    def make(spec: dict[str, Any] | str, files: dict[str, str | bytes] | None = None) -> Path:
        root = tmp_path / "project"
        root.mkdir(exist_ok=True)
        for rel, content in (files or {}).items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        path = root / "pipeline.yaml"
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
        return path

    return make


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped_tests.append(report.nodeid)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # every test that asks for the engine is a Docker test
        if "docker" in getattr(item, "fixturenames", ()) or "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_DOCKER and _skipped_tests:  # Docker tests, and the PostgreSQL ones, must run in CI
        print(f"\nPIPE_REQUIRE_DOCKER is set but {len(_skipped_tests)} test(s) skipped:")
        for nodeid in _skipped_tests:
            print(f"  {nodeid}")
        session.exitstatus = 1
