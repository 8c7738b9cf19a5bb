"""`pipe run` on the kubernetes executor end to end (marker k8s): two stages handing files on through the object
store, then the same run fully cached, then the local Docker executor restoring it from the same cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import pipe

pytestmark = pytest.mark.k8s


def test_pipeline_runs_on_the_cluster_then_cached_then_locally(
        cluster: dict[str, Any], make_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    executor = {"kind": "kubernetes", "namespace": cluster["namespace"], "handoff": "s3://pipe-handoff/e2e/",
                "endpoint": os.environ["PIPE_TEST_K8S_S3_ENDPOINT"], "pending_timeout": "60s"}
    stages = {
        "prepare": {"image": "pipe-busybox:latest", "inputs": ["raw.txt"],
                    "command": "tr a-z A-Z < raw.txt > /outputs/upper.txt; echo prepared"},
        "report": {"image": "pipe-busybox:latest", "needs": ["prepare"],
                   "command": "wc -c < /inputs/prepare/upper.txt > /outputs/size.txt; cat /inputs/prepare/upper.txt"},
    }
    path = make_pipeline({"executor": executor, "stages": stages}, files={"raw.txt": "hello cluster\n"})
    (tmp_path / "project").chmod(0o755)
    env = {"KUBECONFIG": os.environ["PIPE_TEST_KUBECONFIG"]}
    first = pipe("run", path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.read_text().strip() for p in tmp_path.rglob("size.txt")) == ["14"]
    assert "HELLO CLUSTER" in first.stdout + pipe("logs", path, "report", env=env).stdout

    again = pipe("run", path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "cached" in again.stdout

    import yaml

    doc = yaml.safe_load(path.read_text())
    doc.pop("executor")
    path.write_text(yaml.safe_dump(doc))
    on_docker = pipe("run", path)
    assert on_docker.returncode == 0, on_docker.stdout + on_docker.stderr
    assert "cached" in on_docker.stdout and "prepared" not in on_docker.stdout
