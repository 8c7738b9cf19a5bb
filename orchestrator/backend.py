"""Where stages run: the parts of an engine that a run needs, behind one seam, so api.py wires an engine without
knowing it and tests substitute a fake one. `DockerBackend` is the local Docker engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from orchestrator.events import Event
from orchestrator.executor import Executor
from orchestrator.hashing import HashMemo
from orchestrator.imageplan import ImageForecast
from orchestrator.spec import Pipeline

BuildEvents = Callable[[Event], None]  # a Reporter's emit: BuildStarted, BuildProgress, BuildFinished, Notice


class Backend(Protocol):
    def executor(self) -> Executor:
        """A new executor for one run."""
        ...

    def forecast_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                        hash_memo: HashMemo | None) -> dict[str, ImageForecast]:
        """What image each stage would run, building, pulling and writing nothing (dry run)."""
        ...

    def resolve_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path, on_event: BuildEvents,
                       hash_memo: HashMemo | None) -> dict[str, str]:
        """stage -> immutable image id, building or pulling what the forecast says is missing."""
        ...

    def capacity(self) -> tuple[float, int]:
        """(cpus, memory bytes) the running stages' caps may add up to; the default for --jobs."""
        ...

    def gpu_problem(self) -> str | None:
        """Why stages cannot get GPUs here ("the engine has no nvidia runtime ..."), or None when they can."""
        ...

    def sweep(self, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
        """Remove containers a dead run of this state dir left behind (is_alive: the run's lease, None when
        history does not know it); the dead runs' ids."""
        ...


class DockerBackend:
    def __init__(self, docker_url: str | None = None) -> None:
        from orchestrator import docker_executor

        self._client = docker_executor.connect(docker_url)

    def executor(self) -> Executor:
        from orchestrator.docker_executor import DockerExecutor

        return DockerExecutor(self._client)

    def forecast_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                        hash_memo: HashMemo | None) -> dict[str, ImageForecast]:
        from orchestrator import images

        return images.forecast_images(pipeline, stages, self._client, memo_path, hash_memo)

    def resolve_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path, on_event: BuildEvents,
                       hash_memo: HashMemo | None) -> dict[str, str]:
        from orchestrator import images

        return images.resolve_images(pipeline, stages, self._client, memo_path, on_event, hash_memo)

    def sweep(self, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
        from orchestrator import docker_executor

        return docker_executor.sweep_orphans(self._client, owner, is_alive)

    def gpu_problem(self) -> str | None:
        from orchestrator import docker_executor

        return docker_executor.gpu_problem(self._client)

    def capacity(self) -> tuple[float, int]:
        from orchestrator.hostfiles import host_memory_bytes

        return float(os.cpu_count() or 1), host_memory_bytes()
