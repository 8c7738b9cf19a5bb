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


# -- the S3 remote: a real radosgw started by scripts/s3.sh (scripts/test.sh exports its endpoint and keys) --

S3_ENDPOINT = os.environ.get("PIPE_TEST_S3_ENDPOINT")


class S3Bucket:
    """A fresh bucket on the test server; `raw` is a plain boto3 client for what pipe itself must not do."""

    def __init__(self, endpoint: str, name: str, raw: Any) -> None:
        self.endpoint, self.name, self.raw = endpoint, name, raw

    def url(self, prefix: str = "pipe") -> str:
        return f"s3://{self.name}/{prefix}/"

    def object_keys(self) -> list[str]:
        return [o["Key"] for o in self.raw.list_objects_v2(Bucket=self.name).get("Contents", [])]

    def uploads(self) -> list[str]:
        return [u["Key"] for u in self.raw.list_multipart_uploads(Bucket=self.name).get("Uploads", [])]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A bucket of its own on the test S3 server, its credentials in the environment only (the standard chain).

    Skipped where PIPE_TEST_S3_ENDPOINT is unset, except under PIPE_REQUIRE_DOCKER (CI), where that fails.
    """
    if not S3_ENDPOINT:
        if REQUIRE_DOCKER:
            pytest.fail("PIPE_TEST_S3_ENDPOINT is not set: run the tests through scripts/test.sh (scripts/s3.sh)")
        pytest.skip("PIPE_TEST_S3_ENDPOINT is not set (start a server with scripts/s3.sh)")
    import secrets

    import boto3
    import botocore.exceptions

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", os.environ["PIPE_TEST_S3_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", os.environ["PIPE_TEST_S3_SECRET_KEY"])
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/pipe-test")  # no key from ~/.aws
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/pipe-test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    raw = boto3.client("s3", endpoint_url=S3_ENDPOINT, region_name="us-east-1", verify=False)
    name = f"pipe-test-{secrets.token_hex(6)}"
    try:
        raw.create_bucket(Bucket=name)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:  # the server is down although its endpoint is set: never a skip
        pytest.fail(f"the S3 server at {S3_ENDPOINT} refused a bucket: {type(e).__name__}: {e}")
    yield S3Bucket(S3_ENDPOINT, name, raw)
    for upload in raw.list_multipart_uploads(Bucket=name).get("Uploads", []):
        raw.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    while keys := [{"Key": o["Key"]} for o in raw.list_objects_v2(Bucket=name).get("Contents", [])]:
        raw.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    raw.delete_bucket(Bucket=name)
