"""The kubernetes test cluster as a session fixture (scripts/k8s/up.sh; scripts/test.sh runs the k8s tests
inside its network namespace with PIPE_TEST_KUBECONFIG and PIPE_TEST_K8S_S3_ENDPOINT set)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import REQUIRE_DOCKER


def _wait_for(condition: Callable[[], bool], timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    """The API client, a namespace of this session (deleted after) and the hand-off store."""
    kubeconfig, endpoint = os.environ.get("PIPE_TEST_KUBECONFIG"), os.environ.get("PIPE_TEST_K8S_S3_ENDPOINT")
    if not kubeconfig or not endpoint:
        if REQUIRE_DOCKER:
            pytest.fail("PIPE_TEST_KUBECONFIG / PIPE_TEST_K8S_S3_ENDPOINT unset: scripts/test.sh starts the cluster")
        pytest.skip("no test cluster (start one with scripts/k8s/up.sh, run inside its namespace)")
    from kubernetes import client as k8s

    from orchestrator.kube_executor import connect
    from orchestrator.objectstore import ObjectStore

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "pipe")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "pipe-secret")
    api = connect(kubeconfig=kubeconfig)
    core = k8s.CoreV1Api(api)
    namespace = f"pipe-test-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    assert _wait_for(lambda: any(a.metadata.name == "default"
                                 for a in core.list_namespaced_service_account(namespace).items))
    image = subprocess.check_output(["docker", "image", "inspect", "-f", "{{.Id}}", "pipe-busybox:latest"],
                                    text=True).strip()
    yield {"api": api, "namespace": namespace, "image": image,
           "store": ObjectStore(os.environ.get("PIPE_TEST_K8S_S3_URL", "s3://pipe-handoff/"), endpoint)}
    core.delete_namespace(namespace)


