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
    assert "HELLO CLUSTER" in pipe("logs", "latest", "report", path, env=env).stdout

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


def test_kube_context_picks_the_context_and_a_bad_one_is_one_line(
        cluster: dict[str, Any], make_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    import yaml

    config = yaml.safe_load(Path(cluster["kubeconfig"]).read_text())
    good = config["contexts"][0]["name"]
    config["clusters"].append({"name": "broken", "cluster": {**config["clusters"][0]["cluster"],
                                                             "server": "https://127.0.0.1:1"}})
    config["contexts"].append({"name": "broken", "context": {**config["contexts"][0]["context"], "cluster": "broken"}})
    config["current-context"] = "broken"
    kubeconfig = tmp_path / "two-contexts.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    executor = {"kind": "kubernetes", "namespace": cluster["namespace"], "handoff": "s3://pipe-handoff/ctx/",
                "endpoint": cluster["endpoint"], "pending_timeout": "60s", "context": "broken"}
    path = make_pipeline({"executor": executor, "stages": {"hello": {"image": "pipe-busybox:latest",
                                                                     "command": "echo from-the-cluster"}}})
    env = {"KUBECONFIG": str(kubeconfig)}

    broken = pipe("run", path, env=env)  # the file's context (and the current one) does not answer
    assert broken.returncode == 4, broken.stdout + broken.stderr
    assert broken.stderr.strip().splitlines() == [
        "error: kubernetes API unreachable (context broken): " + broken.stderr.split("(context broken): ")[1].strip()]

    unknown = pipe("run", path, "--kube-context", "nope", env=env)
    assert unknown.returncode == 2
    has = ", ".join(sorted(["broken", good]))
    assert unknown.stderr.strip() == f"error: kubernetes context 'nope' is not in the kubeconfig (it has: {has})"

    chosen = pipe("run", path, "--kube-context", good, "--json", env=env)
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    import json

    assert json.loads(chosen.stdout)["stages"]["hello"]["status"] == "succeeded"
    shown = json.loads(pipe("show", "latest", path, "--json", env=env).stdout)
    stage = next(s for s in shown["stages"] if s["stage"] == "hello")
    assert (stage["executor"], stage["node"]) == ("kubernetes", "127.0.0.1"), stage  # the node's name
    assert stage["task_id"].startswith("pipe-hello-"), stage  # the Job
    assert any("without an init process" in w for w in stage["warnings"]), stage  # what a pod lacks, recorded

    local = pipe("run", path, "--executor", "local", "--kube-context", good, env=env)
    assert local.returncode == 2
    assert local.stderr.strip() == "error: --kube-context: the executor is local, not kubernetes"
