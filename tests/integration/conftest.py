"""Fixtures shared by the integration tests: a DockerExecutor on the shared engine, and labels owned by one test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.docker_executor import DockerExecutor
from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE, ContainerSpec, ExecResult


@pytest.fixture
def labels(tmp_path: Path) -> dict[str, str]:
    """Labels that mark a container as this test's own (the `docker` fixture cleans up by them)."""
    return {LABEL_MANAGED: "1", LABEL_PIPELINE: str(tmp_path)}


@pytest.fixture
def executor(docker: Any) -> DockerExecutor:
    return DockerExecutor(docker)


def run(executor: DockerExecutor, spec: ContainerSpec) -> tuple[ExecResult, list[str]]:
    """Run a container to its end; its result and the log lines it printed."""
    lines: list[str] = []
    return executor.run(spec, lines.append), lines
