"""The pure parts of docker_executor: the translation to engine arguments, outcome classification, helpers."""

from __future__ import annotations

import errno
from pathlib import Path

import docker.errors

from orchestrator.docker_executor import (
    classify,
    host_kwargs,
    short_reason,
)
from orchestrator.executor import LABEL_MANAGED, ContainerSpec, Mount, Outcome, SecretFile

MiB = 1024**2


def spec(**overrides: object) -> ContainerSpec:
    base: dict[str, object] = {"name": "train", "image_id": "sha256:abc", "command": ("python3", "train.py")}
    return ContainerSpec(**{**base, **overrides})  # type: ignore[arg-type]


def test_caps_translate_to_engine_units() -> None:
    kw = host_kwargs(spec(cpus=1.5, memory_bytes=256 * MiB, pids=64))
    assert kw["nano_cpus"] == 1_500_000_000
    assert kw["mem_limit"] == kw["memswap_limit"] == 256 * MiB  # equal: no swap
    assert kw["pids_limit"] == 64
    assert "device_requests" not in kw


def test_no_caps_when_spec_has_none() -> None:
    kw = host_kwargs(spec())
    for key in ("nano_cpus", "mem_limit", "memswap_limit", "pids_limit", "device_requests", "user"):
        assert key not in kw


def test_gpus_become_a_device_request() -> None:
    (request,) = host_kwargs(spec(gpus=2))["device_requests"]
    assert request["Count"] == 2
    assert request["Capabilities"] == [["gpu"]]


def test_sandbox_defaults_always_apply() -> None:
    kw = host_kwargs(spec(user="1000:1000", tmp_bytes=64 * MiB, env={"LOG_LEVEL": "info"}))
    assert kw["cap_drop"] == ["ALL"]
    assert kw["security_opt"] == ["no-new-privileges"]
    assert kw["init"] is True
    assert kw["read_only"] is True
    assert kw["privileged"] is False
    assert kw["tmpfs"] == {"/tmp": f"rw,size={64 * MiB},mode=1777"}
    assert kw["environment"] == {"HOME": "/tmp", "LOG_LEVEL": "info"}
    assert kw["network_mode"] == "none"
    assert kw["user"] == "1000:1000"
    for key in ("pid_mode", "userns_mode", "uts_mode", "cap_add", "devices", "volumes"):
        assert key not in kw
    assert kw["ipc_mode"] == "private"


def test_network_true_leaves_the_default_bridge() -> None:
    assert "network_mode" not in host_kwargs(spec(network=True))


def test_command_entrypoint_workdir_and_labels() -> None:
    kw = host_kwargs(spec(entrypoint=("/bin/sh", "-c"), workdir="/workspace", labels={"dev.pipe.run": "r1"}))
    assert kw["command"] == ["python3", "train.py"]
    assert kw["entrypoint"] == ["/bin/sh", "-c"]
    assert kw["working_dir"] == "/workspace"
    assert kw["labels"] == {LABEL_MANAGED: "1", "dev.pipe.run": "r1"}
    assert host_kwargs(spec(command=None))["command"] is None


def test_mounts_are_binds_with_their_read_only_flag(tmp_path: Path) -> None:
    mounts = (
        Mount(tmp_path / "raw.csv", "/workspace/data/raw.csv"),
        Mount(tmp_path / "out", "/outputs", False),
    )
    kw = host_kwargs(spec(mounts=mounts), secrets_dir=tmp_path / "s")
    assert [(m["Target"], m["Source"], m["Type"], m["ReadOnly"]) for m in kw["mounts"]] == [
        ("/workspace/data/raw.csv", str(tmp_path / "raw.csv"), "bind", True),
        ("/outputs", str(tmp_path / "out"), "bind", False),
        ("/run/secrets", str(tmp_path / "s"), "bind", True),
    ]


def test_secret_values_never_reach_the_engine_arguments() -> None:
    kw = host_kwargs(spec(secrets=(SecretFile("API_TOKEN", "hunter2-value"),)))
    assert "hunter2-value" not in repr(kw)


def test_classify_success_and_failure() -> None:
    assert classify(0, {}, memory_bytes=None, timed_out=False, cancelled=False) == (Outcome.SUCCEEDED, "")
    assert classify(3, {}, memory_bytes=None, timed_out=False, cancelled=False) == (
        Outcome.FAILED,
        "exited with code 3",
    )


def test_classify_oom_from_state_names_the_cap() -> None:
    state = {"OOMKilled": True}
    assert classify(137, state, memory_bytes=256 * MiB, timed_out=False, cancelled=False) == (
        Outcome.OOM,
        "killed: out of memory (cap 256 MiB)",
    )


def test_classify_137_under_a_cap_is_oom_even_when_the_engine_does_not_say_so() -> None:
    outcome, reason = classify(
        137, {"OOMKilled": False}, memory_bytes=64 * MiB, timed_out=False, cancelled=False
    )
    assert (outcome, reason) == (Outcome.OOM, "killed: out of memory (cap 64 MiB)")


def test_classify_137_without_a_cap_is_a_plain_failure_naming_the_signal() -> None:
    assert classify(137, {}, memory_bytes=None, timed_out=False, cancelled=False) == (
        Outcome.FAILED,
        "exited with code 137 (SIGKILL)",
    )


def test_classify_what_pipe_did_wins_over_the_exit_code() -> None:
    assert classify(
        137, {"OOMKilled": True}, memory_bytes=MiB, timed_out=True, cancelled=False, timeout_s=1200
    ) == (
        Outcome.TIMEOUT,
        "timed out after 20m00s",
    )
    assert classify(143, {}, memory_bytes=MiB, timed_out=False, cancelled=True) == (
        Outcome.CANCELLED,
        "cancelled",
    )


def test_classify_names_enospc_from_the_last_lines() -> None:
    tail = ["writing model", "OSError: [Errno 28] No space left on device"]
    outcome, reason = classify(1, {}, memory_bytes=None, timed_out=False, cancelled=False, tail=tail)
    assert outcome is Outcome.FAILED
    assert reason == "exited with code 1: no space left on device (ENOSPC)"


def test_short_reason_finds_the_os_error_in_a_chain() -> None:
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        except OSError as inner:
            raise docker.errors.DockerException("Error while fetching server API version: ...") from inner
    except docker.errors.DockerException as e:
        assert short_reason(e) == "No such file or directory"
    assert short_reason(docker.errors.DockerException("a\nb   c")) == "a b c"


