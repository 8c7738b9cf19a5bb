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


def test_a_killed_run_leaves_nothing_once_the_next_run_reaps_it(
        cluster: dict[str, Any], make_pipeline: Callable[..., Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import yaml
    from kubernetes import client as k8s

    from orchestrator.kube_spec import owner_selector
    from orchestrator.objectstore import ObjectStore
    from tests.conftest import wait_for
    from tests.e2e.helpers import start_pipe

    executor = {"kind": "kubernetes", "namespace": cluster["namespace"], "handoff": "s3://pipe-handoff/killed/",
                "endpoint": cluster["endpoint"], "pending_timeout": "60s"}
    stage = {"image": "pipe-busybox:latest", "inputs": ["raw.txt"], "command": "echo started; sleep 300"}
    path = make_pipeline({"executor": executor, "stages": {"long": stage}}, files={"raw.txt": "x\n"})
    (tmp_path / "project").chmod(0o755)
    monkeypatch.setenv("KUBECONFIG", cluster["kubeconfig"])
    batch, core, ns = k8s.BatchV1Api(cluster["api"]), k8s.CoreV1Api(cluster["api"]), cluster["namespace"]
    sel = owner_selector(str(path.parent / "runs"))
    store = ObjectStore("s3://pipe-handoff/killed/", cluster["endpoint"])

    running = start_pipe("run", path)
    try:
        wait_for(lambda: any(p.status.phase == "Running"
                             for p in core.list_namespaced_pod(ns, label_selector=sel).items), 120, "the stage's pod")
    finally:
        running.send_signal(signal.SIGKILL)  # no cleanup of its own: the Job, pod, Secret and input tar remain
        running.wait(30)
    assert batch.list_namespaced_job(ns, label_selector=sel).items
    assert core.list_namespaced_secret(ns, label_selector=sel).items
    assert any(o.key.endswith("/in-0.tar") for o in store.list("k8s/"))

    doc = yaml.safe_load(path.read_text())
    doc["stages"]["long"]["command"] = "echo quick"
    path.write_text(yaml.safe_dump(doc))
    after = pipe("run", path)
    assert after.returncode == 0, after.stdout + after.stderr

    def nothing_left() -> bool:
        return not (batch.list_namespaced_job(ns, label_selector=sel).items
                    or core.list_namespaced_pod(ns, label_selector=sel).items
                    or core.list_namespaced_secret(ns, label_selector=sel).items or store.list("k8s/"))

    wait_for(nothing_left, 60, "no Job, pod, Secret or hand-off object of the killed run")
