"""One stage's container in pipe's own terms, and the Executor protocol that runs it.

No Docker here: docker_executor.py translates a ContainerSpec into engine calls, and parallel.py and its tests
depend only on this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from orchestrator.hashing import TreeDigest

LABEL_PREFIX = "dev.pipe"
LABEL_MANAGED = f"{LABEL_PREFIX}.managed"  # "1" on every container pipe starts
LABEL_PIPELINE = f"{LABEL_PREFIX}.pipeline"  # the pipeline's state dir, resolved: one lock, one owner
LABEL_RUN = f"{LABEL_PREFIX}.run"
LABEL_STAGE = f"{LABEL_PREFIX}.stage"
LABEL_PID = f"{LABEL_PREFIX}.pid"  # its pipe process; the orphan sweep reads it for runs not in history
LABEL_HOST = f"{LABEL_PREFIX}.host"


@dataclass(frozen=True)
class Mount:
    source: Path  # a host path
    target: str  # a path inside the container
    read_only: bool = True
    stored: TreeDigest | None = None  # the content is in the object store's blobs (remote.py's layout) as this
    # tree: a cluster executor's node takes it from there, and `source` need not exist on this host


@dataclass(frozen=True)
class SecretFile:
    """A secret delivered as /run/secrets/<name> (mode 0400) on a tmpfs, never as an environment variable."""

    name: str
    value: str


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the engine needs for one attempt of one stage. image_id is immutable, never a tag."""

    name: str  # the stage name, for messages
    image_id: str
    command: tuple[str, ...] | None  # None: the image's CMD
    entrypoint: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    workdir: str = "/workspace"
    cpus: float | None = None
    memory_bytes: int | None = None
    gpus: int = 0
    pids: int | None = None
    timeout_s: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None  # "uid:gid"; None means the image's user
    network: bool = False
    tmp_bytes: int = 256 * 1024**2
    secrets: tuple[SecretFile, ...] = ()
    log_path: Path | None = None  # where the executor appends the container's output (capped)
    fetch_outputs: bool = True  # False: a cluster executor leaves /outputs in the store (ExecResult.stored_outputs)


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # non-zero exit
    OOM = "oom"  # killed under its memory cap
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"  # stopped by stop_all (Ctrl-C, SIGTERM, run deadline)
    ERROR = "error"  # infrastructure: the engine failed or the container vanished


DISK_FULL = "no space left on device (ENOSPC)"  # the end of a disk-full stage's reason, for people


@dataclass(frozen=True)
class RanOn:
    """Where an attempt ran, for history: the executor kind, the node, and the engine's id of the attempt
    (the container on one engine, the task on a swarm, the Job on Kubernetes)."""

    executor: str
    node: str | None = None
    task_id: str | None = None


@dataclass(frozen=True)
class ExecResult:
    outcome: Outcome
    exit_code: int | None
    reason: str  # one line, e.g. "killed: out of memory (cap 256 MiB)"; "" on success
    started_at: datetime
    finished_at: datetime
    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None
    disk_full: bool = False  # it failed because a disk filled up (its outputs are then removed)
    node_lost: bool = False  # the node it ran on was lost (a cluster executor): `retry_on: [node_lost]` matches
    ran_on: RanOn | None = None  # None when no attempt reached a node (cancelled before, refused)
    warnings: tuple[str, ...] = ()  # what the sandbox lacked on this executor (kube_spec.sandbox_gaps), for history
    stored_outputs: TreeDigest | None = None  # /outputs as the node hashed them, in the store's blobs (swarm);
    # on the host too unless the spec said fetch_outputs=False

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


OutputSink = Callable[[str], None]  # receives decoded lines of stdout/stderr as they come


class Executor(Protocol):
    def run(self, spec: ContainerSpec, on_output: OutputSink) -> ExecResult:
        """Run one container to its end; the container is removed on every path. Raises EngineError only when
        the engine cannot be used at all; a stage that fails comes back as an ExecResult."""
        ...

    def stop_all(self) -> None:
        """Stop every container this executor is running (from a signal handler's thread); idempotent."""
        ...


def pid_exists(pid: int) -> bool:
    """Whether a process `pid` exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def starter_alive(host: str | None, pid: str | None) -> bool:
    """Whether the pipe process a container's (or Job's) host and pid labels name may still be running: not when
    it names no pid, or this host and a pid that no longer exists; another host's is taken as alive."""
    try:
        number = int(pid or "")
    except ValueError:
        return False  # no pid: not started by a pipe that records one
    return host != os.uname().nodename or pid_exists(number)
