"""docker_executor.gpu_problem against fake `docker info` answers: an nvidia runtime or CDI specs give GPUs."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.docker_executor import gpu_problem
from orchestrator.errors import EngineError


class FakeClient:
    def __init__(self, info: dict[str, Any] | Exception) -> None:
        self._info = info

    def info(self) -> dict[str, Any]:
        if isinstance(self._info, Exception):
            raise self._info
        return self._info


def test_an_engine_with_the_nvidia_runtime_or_cdi_specs_can_give_gpus() -> None:
    assert gpu_problem(FakeClient({"Runtimes": {"runc": {}, "nvidia": {}}})) is None  # type: ignore[arg-type]
    assert gpu_problem(FakeClient({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi"]})) is None  # type: ignore[arg-type]


def test_an_engine_without_says_which_runtimes_it_has() -> None:
    problem = gpu_problem(FakeClient({"Runtimes": {"runc": {}, "io.containerd.runc.v2": {}}}))  # type: ignore[arg-type]
    assert problem == ("the engine has no GPU runtime (runtimes: io.containerd.runc.v2, runc): install the "
                       "nvidia-container-toolkit and restart the engine, or set gpus: 0")


def test_an_engine_that_does_not_answer_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="did not answer `docker info`"):
        gpu_problem(FakeClient(OSError("connection reset")))  # type: ignore[arg-type]
