"""The executor contract against a real Kubernetes API server and kubelet (scripts/k8s/up.sh; marker k8s).

Each case is a function of an executor factory and a ContainerSpec builder, so it folds into the parametrised
contract suite (tests/contract/) as the `kubernetes` parameter. Runs inside the cluster's network namespace:
scripts/test.sh does `ip netns exec pipe-k8s python3 -m pytest -m k8s`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.executor import (
    LABEL_MANAGED,
    LABEL_PIPELINE,
    LABEL_RUN,
    LABEL_STAGE,
    ContainerSpec,
    Mount,
    Outcome,
    SecretFile,
)

pytestmark = pytest.mark.k8s


from tests.contract.conftest import _wait_for


@pytest.fixture
def make_executor(cluster: dict[str, Any]) -> Callable[..., Any]:
    from orchestrator.kube_executor import KubernetesExecutor, KubeSettings

    def make(pending_timeout_s: float = 60) -> KubernetesExecutor:
        settings = KubeSettings(namespace=cluster["namespace"], handoff_url="s3://pipe-handoff/",
                                agent_image=cluster["image"], pending_timeout_s=pending_timeout_s)
        return KubernetesExecutor(cluster["api"], settings, cluster["store"])

    return make


@pytest.fixture
def make_spec(cluster: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., ContainerSpec]:
    run_id = f"t{uuid.uuid4().hex[:8]}"

    def make(script: str, **kw: Any) -> ContainerSpec:
        labels = {LABEL_MANAGED: "1", LABEL_PIPELINE: str(tmp_path), LABEL_RUN: run_id, LABEL_STAGE: "s"}
        base: dict[str, Any] = {"name": "s", "image_id": cluster["image"], "command": ("sh", "-c", script),
                                "cpus": 0.5, "memory_bytes": 64 << 20, "user": "1000:1000", "labels": labels}
        return ContainerSpec(**{**base, **kw})

    return make


@pytest.fixture(autouse=True)
def no_leftovers(cluster: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    """Fails the test if a Job, pod or Secret of it remains (deletion is asynchronous: wait a bounded time)."""
    yield
    from kubernetes import client as k8s

    from orchestrator.kube_spec import owner_selector

    batch, core, ns = k8s.BatchV1Api(cluster["api"]), k8s.CoreV1Api(cluster["api"]), cluster["namespace"]
    sel = owner_selector(str(tmp_path))

    def clean() -> bool:
        return not (batch.list_namespaced_job(ns, label_selector=sel).items
                    or core.list_namespaced_pod(ns, label_selector=sel).items
                    or core.list_namespaced_secret(ns, label_selector=sel).items)

    assert _wait_for(clean, 90), "Jobs, pods or Secrets left behind"


def test_success_streams_logs_under_the_hardened_sandbox(make_executor: Any, make_spec: Any) -> None:
    lines: list[str] = []
    script = ("id; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; touch /x 2>&1 || true; "
              "echo tmp > /tmp/ok && cat /tmp/ok")
    result = make_executor().run(make_spec(script), lines.append)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert result.exit_code == 0
    assert lines[0].startswith("uid=1000 gid=1000")
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines and "Seccomp:\t2" in lines
    assert any("Read-only file system" in line for line in lines)
    assert lines[-1] == "tmp"


def test_nonzero_exit_is_failed_with_its_code(make_executor: Any, make_spec: Any) -> None:
    result = make_executor().run(make_spec("echo about to fail; exit 7"), lambda _: None)
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.FAILED, 7, "exited with code 7")


def test_memory_cap_is_oom(make_executor: Any, make_spec: Any) -> None:
    spec = make_spec("dd if=/dev/zero of=/dev/null bs=200M count=1", memory_bytes=32 << 20)
    result = make_executor().run(spec, lambda _: None)
    assert result.outcome is Outcome.OOM, result.reason


def test_timeout_is_the_jobs_deadline(make_executor: Any, make_spec: Any) -> None:
    result = make_executor().run(make_spec("sleep 300", timeout_s=3), lambda _: None)
    assert result.outcome is Outcome.TIMEOUT
    assert "activeDeadlineSeconds" in result.reason


def test_inputs_read_only_and_outputs_come_back(make_executor: Any, make_spec: Any, tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.txt").write_text("from upstream\n")
    (tmp_path / "f.csv").write_text("x,y\n")
    out = tmp_path / "out"
    out.mkdir()
    tmp_path.chmod(0o755)
    mounts = (Mount(tmp_path / "up", "/inputs/up"), Mount(tmp_path / "f.csv", "/workspace/f.csv"),
              Mount(out, "/outputs", read_only=False))
    script = ("cat /inputs/up/a.txt /workspace/f.csv; touch /inputs/up/b 2>&1 || true; "
              "head -c 300000 /dev/urandom > /outputs/blob; mkdir /outputs/sub; echo deep > /outputs/sub/d")
    lines: list[str] = []
    result = make_executor().run(make_spec(script, mounts=mounts), lines.append)
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert lines[:2] == ["from upstream", "x,y"]
    assert "Read-only file system" in lines[2]
    assert (out / "sub" / "d").read_text() == "deep\n"
    assert (out / "blob").stat().st_size == 300000


def test_secrets_are_files_never_in_the_job(make_executor: Any, make_spec: Any, cluster: dict[str, Any]) -> None:
    from kubernetes import client as k8s

    seen: list[str] = []
    spec = make_spec('cat /run/secrets/TOKEN; echo; env | grep -c "$(cat /run/secrets/TOKEN)" || true; sleep 2',
                     secrets=(SecretFile("TOKEN", "s3cr3t-value"),))
    batch = k8s.BatchV1Api(cluster["api"])

    def watch() -> None:
        if _wait_for(lambda: bool(batch.list_namespaced_job(cluster["namespace"]).items), 30):
            seen.extend(str(cluster["api"].sanitize_for_serialization(j))
                        for j in batch.list_namespaced_job(cluster["namespace"]).items)

    watcher = threading.Thread(target=watch)
    watcher.start()
    lines: list[str] = []
    result = make_executor().run(spec, lines.append)
    watcher.join()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert lines[:2] == ["***", "0"]  # read from the file (redacted in the log), absent from the environment
    assert seen and not any("s3cr3t-value" in job for job in seen)


def test_missing_image_fails_at_the_pending_deadline_with_the_reason(make_executor: Any, make_spec: Any) -> None:
    spec = make_spec("true", image_id="sha256:" + "0" * 64)
    result = make_executor(pending_timeout_s=5).run(spec, lambda _: None)
    assert result.outcome is Outcome.ERROR
    assert "ErrImageNeverPull" in result.reason


def test_stop_all_cancels_and_deletes_the_job_and_its_pods(make_executor: Any, make_spec: Any) -> None:
    executor = make_executor()
    lines: list[str] = []
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(executor.run(make_spec("echo up; sleep 300"),
                                                                          lines.append)))
    runner.start()
    assert _wait_for(lambda: lines == ["up"], 60)
    executor.stop_all()
    runner.join(120)
    assert results and results[0].outcome is Outcome.CANCELLED
    assert executor.run(make_spec("true"), lambda _: None).outcome is Outcome.CANCELLED  # later runs too


def test_reaper_deletes_what_a_dead_run_left(cluster: dict[str, Any], make_spec: Any, tmp_path: Path) -> None:
    from kubernetes import client as k8s

    from orchestrator import kube_spec
    from orchestrator.kube_executor import sweep_jobs

    spec = make_spec("sleep 300")  # as a pipe killed by SIGKILL leaves it: a Job and its Secret, running
    name = kube_spec.dns_name("pipe", "orphan", uuid.uuid4().hex[:6])
    handoff = kube_spec.Handoff((), ())
    ns = cluster["namespace"]
    k8s.CoreV1Api(cluster["api"]).create_namespaced_secret(
        ns, kube_spec.secret_manifest(name, spec.labels, spec, {}, owner=str(tmp_path)))
    k8s.BatchV1Api(cluster["api"]).create_namespaced_job(ns, kube_spec.job_manifest(
        spec, name=name, image=cluster["image"], agent_image=cluster["image"], handoff=handoff,
        owner=str(tmp_path)))
    run_id = spec.labels[LABEL_RUN]
    assert sweep_jobs(cluster["api"], ns, str(tmp_path), lambda r: True) == []  # a live run is left alone
    assert sweep_jobs(cluster["api"], ns, str(tmp_path), lambda r: False) == [run_id]
