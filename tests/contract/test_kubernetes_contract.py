"""What only the kubernetes executor has, on a real API server and kubelet (scripts/k8s/up.sh; marker k8s): the
generic cases run on it as the `kubernetes` parameter of test_executor_contract.py; these are the rest (secrets
as files never in the Job, the pending deadline's reasons, the reaper), on the same Harness. Runs inside the
cluster's network namespace: scripts/test.sh does `ip netns exec pipe-k8s python3 -m pytest -m k8s`."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.executor import LABEL_RUN, Outcome, SecretFile
from tests.conftest import wait_for
from tests.contract.conftest import KubeHarness, _wait_for, kube_harness

pytestmark = pytest.mark.k8s


@pytest.fixture
def kube(cluster: dict[str, Any], tmp_path: Path) -> Iterator[KubeHarness]:
    """The kubernetes Harness; fails the test if a Job, pod, Secret or hand-off object of it remains."""
    h = kube_harness(cluster, str(tmp_path))
    yield h
    wait_for(lambda: not h.leftovers(), timeout=h.removal_bound_s, what="no Job, pod, Secret or object left")


def test_secrets_are_files_never_in_the_job(kube: KubeHarness, cluster: dict[str, Any]) -> None:
    from kubernetes import client as k8s

    seen: list[str] = []
    spec = kube.spec("s", 'cat /run/secrets/TOKEN; echo; env | grep -c "$(cat /run/secrets/TOKEN)" || true; sleep 2',
                     secrets=(SecretFile("TOKEN", "s3cr3t-value"),))
    batch = k8s.BatchV1Api(cluster["api"])

    def watch() -> None:
        if _wait_for(lambda: bool(batch.list_namespaced_job(cluster["namespace"]).items), 30):
            seen.extend(str(cluster["api"].sanitize_for_serialization(j))
                        for j in batch.list_namespaced_job(cluster["namespace"]).items)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result, lines = kube.run(spec)
    watcher.join()
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert lines[:2] == ["***", "0"]  # read from the file (redacted in the log), absent from the environment
    assert seen and not any("s3cr3t-value" in job for job in seen)


def test_a_missing_image_fails_at_the_pending_deadline_with_the_waiting_reason(kube: KubeHarness) -> None:
    result, _ = kube.run(kube.spec("s", "true", image="sha256:" + "0" * 64))
    assert result.outcome is Outcome.ERROR
    assert result.reason.startswith("pending for 20.0s: ErrImageNeverPull"), result.reason


def test_an_unschedulable_pod_fails_at_the_pending_deadline_with_the_events_reason(
        kube: KubeHarness, cluster: dict[str, Any]) -> None:
    from orchestrator.kube_spec import Placement

    executor = kube.executor
    settings = replace(executor._settings, pending_timeout_s=8, placements={"s": Placement({"pool": "none"})})
    kube.executor = type(executor)(cluster["api"], settings, cluster["store"])
    result, _ = kube.run(kube.spec("s", "true"))
    assert result.outcome is Outcome.ERROR
    assert result.reason.startswith("pending for 8.00s: FailedScheduling: 0/1 nodes are available"), result.reason
    assert "didn't match Pod's node affinity" in result.reason  # the scheduler's own message


def test_reaper_deletes_what_a_dead_run_left(kube: KubeHarness, cluster: dict[str, Any]) -> None:
    from kubernetes import client as k8s

    from orchestrator import kube_spec
    from orchestrator.kube_executor import sweep_jobs

    spec = kube.spec("s", "sleep 300")  # as a pipe killed by SIGKILL leaves it: a Job and its Secret, running
    name = kube_spec.dns_name("pipe", "orphan", uuid.uuid4().hex[:6])
    ns = cluster["namespace"]
    k8s.CoreV1Api(cluster["api"]).create_namespaced_secret(
        ns, kube_spec.secret_manifest(name, spec.labels, spec, {}, owner=kube.owner))
    k8s.BatchV1Api(cluster["api"]).create_namespaced_job(ns, kube_spec.job_manifest(
        spec, name=name, image=cluster["image"], agent_image=cluster["image"], handoff=kube_spec.Handoff((), ()),
        owner=kube.owner))
    run_id = spec.labels[LABEL_RUN]
    assert sweep_jobs(cluster["api"], ns, kube.owner, lambda r: True) == []  # a live run is left alone
    assert f"job {name}" in kube.leftovers()
    assert sweep_jobs(cluster["api"], ns, kube.owner, lambda r: False) == [run_id]
    # the kube fixture asserts that the Job, its pod and its Secret are gone
