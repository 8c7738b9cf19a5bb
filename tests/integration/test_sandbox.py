"""Issue 6 with real containers: the sandbox every stage gets by default, and secrets that never leak."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from orchestrator.docker_executor import DockerExecutor
from orchestrator.executor import (
    LABEL_PIPELINE,
    ContainerSpec,
    ExecResult,
    Outcome,
    SecretFile,
)
from tests.conftest import BUSYBOX, wait_for
from tests.integration.conftest import run

MiB = 1024**2
USER = "1000:1000"
SECRET = "pipe-test-secret-3f9a1c77"


def sh(script: str, labels: dict[str, str], **fields: Any) -> ContainerSpec:
    fields.setdefault("user", USER)
    return ContainerSpec(
        name="stage", image_id=BUSYBOX, command=("sh", "-c", script), labels=labels, **fields
    )


def inspect_while_running(
    executor: DockerExecutor, docker: Any, tmp_path: Path, spec: ContainerSpec
) -> tuple[dict[str, Any], ExecResult]:
    """docker inspect of the stage's container while it runs `sleep`, then stop it."""
    box: list[ExecResult] = []
    thread = threading.Thread(target=lambda: box.append(executor.run(spec, lambda _: None)), daemon=True)
    thread.start()
    try:
        container = wait_for(
            lambda: next(
                iter(
                    docker.containers.list(
                        ignore_removed=True, filters={"label": f"{LABEL_PIPELINE}={tmp_path}"}
                    )
                ),
                None,
            )
        )
        attrs = docker.api.inspect_container(container.id)
    finally:
        executor.stop_all()
        thread.join(timeout=60)
    return attrs, box[0]


def test_container_defaults_seen_by_docker_inspect(
    executor: DockerExecutor, docker: Any, labels: dict[str, str], tmp_path: Path
) -> None:
    spec = sh("sleep 30", labels, memory_bytes=128 * MiB, pids=64, tmp_bytes=32 * MiB)
    attrs, result = inspect_while_running(executor, docker, tmp_path, spec)
    host = attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True
    assert host["Init"] is True
    assert host["NetworkMode"] == "none"
    assert host["Privileged"] is False
    assert host["PidMode"] == "" and host["UsernsMode"] == "" and host["UTSMode"] == ""
    assert host["IpcMode"] == "private"
    assert host["Tmpfs"] == {"/tmp": f"rw,size={32 * MiB},mode=1777"}
    assert host["Memory"] == host["MemorySwap"] == 128 * MiB
    assert host["PidsLimit"] == 64
    assert not host["Binds"]
    assert attrs["Config"]["User"] == USER
    assert "HOME=/tmp" in attrs["Config"]["Env"]
    assert "/var/run/docker.sock" not in json.dumps(attrs)
    assert result.outcome is Outcome.CANCELLED


def test_from_inside_no_privileges_read_only_root_writable_tmp_no_network(
    executor: DockerExecutor, labels: dict[str, str]
) -> None:
    script = (
        "grep -E '^(NoNewPrivs|CapEff):' /proc/self/status; "
        "touch /escape 2>/dev/null && echo root-writable || echo root-read-only; "
        "echo hi > /tmp/probe && echo tmp-writable; "
        "echo HOME=$HOME; "
        "echo routes=$(tail -n +2 /proc/net/route | wc -l); "
        "echo interfaces=$(ls /sys/class/net | tr '\\n' ' '); "
        "echo id=$(id -u):$(id -g)"
    )
    result, lines = run(executor, sh(script, labels))
    assert result.outcome is Outcome.SUCCEEDED
    out = [" ".join(line.split()) for line in lines]
    assert "NoNewPrivs: 1" in out
    assert "CapEff: 0000000000000000" in out
    assert "root-read-only" in out
    assert "tmp-writable" in out
    assert "HOME=/tmp" in out
    assert "routes=0" in out
    assert "interfaces=lo" in out
    assert f"id={USER}" in out


def test_network_true_has_a_route(executor: DockerExecutor, labels: dict[str, str]) -> None:
    result, lines = run(
        executor, sh("echo routes=$(tail -n +2 /proc/net/route | wc -l)", labels, network=True)
    )
    assert result.outcome is Outcome.SUCCEEDED
    assert lines != ["routes=0"] and lines[0].startswith("routes=")


def test_tmp_is_size_capped(executor: DockerExecutor, labels: dict[str, str]) -> None:
    result, lines = run(executor, sh("dd if=/dev/zero of=/tmp/big bs=1M count=8", labels, tmp_bytes=2 * MiB))
    assert result.outcome is Outcome.FAILED
    assert any("No space left on device" in line for line in lines)


def test_root_only_when_asked(executor: DockerExecutor, labels: dict[str, str]) -> None:
    # stderr folded into stdout inside the shell: the engine's two streams arrive in no fixed order
    result, lines = run(executor, sh("id -u; touch /escape 2>&1", labels, user="root"))
    assert lines[0] == "0"
    assert "Read-only file system" in lines[1]
    assert result.outcome is Outcome.FAILED  # root, yet the root filesystem stays read-only


def test_secret_is_a_0400_file_and_nowhere_else(
    executor: DockerExecutor, docker: Any, labels: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "stage.log"
    secrets = (SecretFile("API_TOKEN", SECRET),)
    script = (
        "stat -c '%a %u' /run/secrets/API_TOKEN; "
        '[ "$(cat /run/secrets/API_TOKEN)" = \'' + SECRET + "' ] && echo secret-readable; "
        "env | grep -c " + SECRET[:12] + "; "
        "echo leaked: $(cat /run/secrets/API_TOKEN)"
    )
    result, lines = run(executor, sh(script, labels, secrets=secrets, log_path=log))
    assert result.outcome is Outcome.SUCCEEDED
    assert lines[0] == "400 1000"
    assert "secret-readable" in lines
    assert lines[2] == "0"  # not in the environment
    assert lines[3] == "leaked: ***"  # printed by the stage, redacted before pipe passes it on
    assert SECRET not in log.read_text()
    assert not list(Path("/dev/shm").glob("pipe-secrets-*/secrets/API_TOKEN"))  # the tmpfs folder is gone


def test_secret_absent_from_docker_inspect(
    executor: DockerExecutor, docker: Any, labels: dict[str, str], tmp_path: Path
) -> None:
    spec = sh("sleep 30", labels, secrets=(SecretFile("API_TOKEN", SECRET),))
    attrs, _ = inspect_while_running(executor, docker, tmp_path, spec)
    text = json.dumps(attrs)
    assert SECRET not in text
    secrets_mounts = [m for m in attrs["Mounts"] if m["Destination"] == "/run/secrets"]
    assert len(secrets_mounts) == 1 and secrets_mounts[0]["RW"] is False
    assert secrets_mounts[0]["Source"].startswith("/dev/shm/pipe-secrets-")


def test_secrets_folder_is_removed_when_the_container_cannot_be_created(
    executor: DockerExecutor, labels: dict[str, str]
) -> None:
    before = set(Path("/dev/shm").glob("pipe-secrets-*"))
    spec = ContainerSpec(
        name="stage",
        image_id="sha256:" + "0" * 64,
        command=("true",),
        labels=labels,
        user=USER,
        secrets=(SecretFile("API_TOKEN", SECRET),),
    )
    result, _ = run(executor, spec)
    assert result.outcome is Outcome.ERROR
    assert set(Path("/dev/shm").glob("pipe-secrets-*")) <= before
