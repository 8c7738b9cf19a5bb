"""The executor contract suite's harness: the same tests against the local DockerExecutor and the SwarmExecutor on
the private 3-node swarm of scripts/cluster.sh (PIPE_TEST_SWARM_HOST; in CI, scripts/test.sh brings it up).

A Harness runs ContainerSpecs and answers what the tests ask of an engine: the image to use, the containers
of a test left on any node, the cgroup a stage saw. Nothing skips under PIPE_REQUIRE_DOCKER (CI).

The third parameter, `kubernetes` (marker k8s), runs the same cases as batch/v1 Jobs on the test cluster
(`cluster`: scripts/k8s/up.sh; scripts/test.sh runs the k8s tests inside its network namespace with
PIPE_TEST_KUBECONFIG, PIPE_TEST_K8S_S3_ENDPOINT and PIPE_TEST_K8S_NODE_DOCKER, the node's engine, set). What a pod
cannot get (kube_spec.GAPS) a case asserts as the documented warning instead (Harness.enforces, Harness.warned)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.executor import (
    LABEL_MANAGED,
    LABEL_PIPELINE,
    LABEL_RUN,
    LABEL_STAGE,
    ContainerSpec,
    ExecResult,
)
from tests.conftest import BUSYBOX, REQUIRE_DOCKER

SWARM_HOST = os.environ.get("PIPE_TEST_SWARM_HOST")
SWARM_NODES = [u for u in os.environ.get("PIPE_TEST_SWARM_NODES", "").split(",") if u]
SWARM_REGISTRY = os.environ.get("PIPE_TEST_SWARM_REGISTRY", "")
SWARM_S3_NODE = os.environ.get("PIPE_TEST_SWARM_S3_NODE_ENDPOINT", "")
SWARM_HANDOFF = os.environ.get("PIPE_TEST_SWARM_HANDOFF_DIR", "")
REMOVAL_BOUND_S = 15  # how long a node may take to remove the container of a removed service
KUBE_REMOVAL_BOUND_S = 60  # a deleted Job's pods: their grace period (10 s), then Foreground propagation
KUBE_PENDING_S = 20  # the harness's pending deadline: a pod of a missing image fails after this
NODE_DOCKER = os.environ.get("PIPE_TEST_K8S_NODE_DOCKER", "")  # the kubelet's engine (pods' sandboxes are on it)
CLUSTER_SH = Path(__file__).resolve().parents[2] / "scripts" / "cluster.sh"


def kill_node(name: str) -> None:
    """The machine `name` (n2, n3) is lost: every process of its daemon SIGKILLed at once (scripts/cluster.sh)."""
    subprocess.run(["bash", str(CLUSTER_SH), "kill-node", name], check=True, capture_output=True, timeout=60)


def start_node(name: str) -> None:
    """Bring `name` back; returns once all 3 nodes are Ready again, so later tests still have a 3-node swarm."""
    subprocess.run(["bash", str(CLUSTER_SH), "start-node", name], check=True, capture_output=True, timeout=180)


def node_of(clients: list[Any], owner: str) -> str | None:
    """n1..n3: the node whose engine runs a stage task (not a hand-off agent) of `owner` (SWARM_NODES are in node
    order)."""
    for i, client in enumerate(clients, start=1):
        for c in client.api.containers(filters={"label": f"{LABEL_PIPELINE}={owner}"}):  # no inspect: no race
            if (c.get("Labels") or {}).get("com.docker.swarm.service.name", "").endswith("-stage"):
                return f"n{i}"
    return None


@dataclass
class Harness:
    kind: str
    executor: Any
    image: str  # what ContainerSpec.image_id holds for the busybox image
    owner: str  # LABEL_PIPELINE of this test's specs
    clients: list[Any] = field(default_factory=list)  # every engine a container may land on
    manager: Any = None
    removal_bound_s: float = REMOVAL_BOUND_S

    def enforces(self, what: str) -> bool:
        """Whether this executor gives the sandbox feature `what` (a key of kube_spec.GAPS)."""
        return True

    def warned(self, result: ExecResult, what: str) -> bool:
        """Whether `result` carries the documented warning that `what` is not enforced."""
        return False

    def spec(self, name: str, command: str, **kwargs: Any) -> ContainerSpec:
        labels = {LABEL_MANAGED: "1", LABEL_PIPELINE: self.owner, LABEL_RUN: "r1", LABEL_STAGE: name}
        return ContainerSpec(name=name, image_id=kwargs.pop("image", self.image), command=("sh", "-c", command),
                             labels=labels, user=f"{os.getuid()}:{os.getgid()}", **kwargs)

    def run(self, spec: ContainerSpec) -> tuple[ExecResult, list[str]]:
        lines: list[str] = []
        return self.executor.run(spec, lines.append), lines

    def leftovers(self) -> list[str]:
        """Containers (every node), services, secrets and networks of this test still there."""
        found = []
        for client in self.clients:
            for c in client.api.containers(all=True, filters={"label": f"{LABEL_PIPELINE}={self.owner}"}):
                found.append(f"container {c['Names'][0]}")  # a listing only: no inspect to race the removal
        if self.manager is not None:
            flt = {"label": [f"{LABEL_PIPELINE}={self.owner}"]}
            found += [f"service {s['Spec']['Name']}" for s in self.manager.api.services(filters=flt)]
            found += [f"secret {s['Spec']['Name']}" for s in self.manager.api.secrets(filters=flt)]
            found += [f"network {n['Name']}" for n in self.manager.api.networks(filters=flt)]
            for node_dir in sorted(Path(SWARM_HANDOFF).parent.glob("local-n*")):  # the nodes' hand-off folders
                found += [f"hand-off folder {p}" for p in node_dir.iterdir()]
        return found


@dataclass
class KubeHarness(Harness):
    """The kubernetes executor on the test cluster: leftovers are the Jobs, pods and Secrets of this test's owner
    and any hand-off object of an attempt (each attempt deletes its own `k8s/<job>/`)."""

    cluster: dict[str, Any] = field(default_factory=dict)

    def enforces(self, what: str) -> bool:
        from orchestrator.kube_spec import GAPS

        return what not in GAPS

    def warned(self, result: ExecResult, what: str) -> bool:
        from orchestrator.kube_spec import GAPS

        return any(GAPS[what] in w for w in result.warnings)

    def leftovers(self) -> list[str]:
        from kubernetes import client as k8s

        from orchestrator.kube_spec import owner_selector

        api, ns, sel = self.cluster["api"], self.cluster["namespace"], owner_selector(self.owner)
        found = [f"job {j.metadata.name}" for j in k8s.BatchV1Api(api).list_namespaced_job(ns, label_selector=sel).items]
        core = k8s.CoreV1Api(api)
        found += [f"pod {p.metadata.name}" for p in core.list_namespaced_pod(ns, label_selector=sel).items]
        found += [f"secret {s.metadata.name}" for s in core.list_namespaced_secret(ns, label_selector=sel).items]
        found += [f"object {o.key}" for o in self.cluster["store"].list("k8s/")]
        return found


def kube_executor(cluster: dict[str, Any], pending_timeout_s: float = KUBE_PENDING_S) -> Any:
    from orchestrator.kube_executor import KubernetesExecutor, KubeSettings

    settings = KubeSettings(namespace=cluster["namespace"], handoff_url=cluster["store_url"],
                            agent_image=cluster["image"], pending_timeout_s=pending_timeout_s)
    return KubernetesExecutor(cluster["api"], settings, cluster["store"])


def kube_harness(cluster: dict[str, Any], owner: str, pending_timeout_s: float = KUBE_PENDING_S) -> KubeHarness:
    import docker as sdk

    if not NODE_DOCKER:  # the cluster is there (PIPE_TEST_KUBECONFIG), so this is a misconfiguration
        pytest.fail("PIPE_TEST_K8S_NODE_DOCKER is unset: scripts/test.sh passes the node's engine")
    clients = [sdk.DockerClient(base_url=NODE_DOCKER)]  # a pod's sandbox container carries the pod's labels
    return KubeHarness("kubernetes", kube_executor(cluster, pending_timeout_s), cluster["image"], owner,
                       clients=clients, removal_bound_s=KUBE_REMOVAL_BOUND_S, cluster=cluster)


def _swarm_required() -> None:
    if not SWARM_HOST:
        if REQUIRE_DOCKER:
            pytest.fail("PIPE_TEST_SWARM_HOST is not set: run the tests through scripts/test.sh (scripts/cluster.sh)")
        pytest.skip("PIPE_TEST_SWARM_HOST is not set (start the cluster with scripts/cluster.sh)")


@pytest.fixture(scope="session")
def swarm_image() -> str:
    """pipe-busybox on the manager, pushed to the registry once: its image id (refs map it to the digest)."""
    _swarm_required()
    import docker

    return str(docker.DockerClient(base_url=SWARM_HOST).images.get(BUSYBOX).id)


def swarm_backend(s3: Any, tmp_path: Path, **executor: Any) -> Any:
    from orchestrator.spec import Pipeline
    from orchestrator.swarm_backend import SwarmBackend

    pipeline = Pipeline.model_validate({
        "stages": {"a": {"image": BUSYBOX, **executor.pop("stage", {})}},
        "executor": {"kind": "swarm", "host": SWARM_HOST, "registry": SWARM_REGISTRY, "handoff_dir": SWARM_HANDOFF,
                     "store": {"url": s3.url("handoff"), "endpoint": s3.endpoint, "node_endpoint": SWARM_S3_NODE},
                     **executor},
    })
    return SwarmBackend(pipeline)


@pytest.fixture(params=["local", "swarm", pytest.param("kubernetes", marks=pytest.mark.k8s)])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    owner = str(tmp_path)
    if request.param == "local":
        docker = request.getfixturevalue("docker")
        from orchestrator.docker_executor import DockerExecutor

        h = Harness("local", DockerExecutor(docker), BUSYBOX, owner, clients=[docker])
    elif request.param == "kubernetes":
        h = kube_harness(request.getfixturevalue("cluster"), owner)
    else:
        import docker as sdk

        image = request.getfixturevalue("swarm_image")
        s3 = request.getfixturevalue("s3")
        backend = swarm_backend(s3, tmp_path)
        backend._refs[image] = backend.publish(image, "pipe/busybox")
        h = Harness("swarm", backend.executor(), image, owner,
                    clients=[sdk.DockerClient(base_url=u) for u in SWARM_NODES], manager=backend._client)
    yield h
    # a node removes a task's container shortly after its service is removed (asynchronously): bounded here
    from tests.conftest import wait_for

    try:
        wait_for(lambda: not h.leftovers(), timeout=h.removal_bound_s, what="no containers left on any node")
    except AssertionError:
        pass
    leftovers = h.leftovers()
    for client in h.clients if h.kind != "kubernetes" else ():  # never leave a failed test's containers behind
        for c in client.api.containers(all=True, filters={"label": f"{LABEL_PIPELINE}={owner}"}):
            with suppress(Exception):  # gone meanwhile
                client.api.remove_container(c["Id"], force=True)
    assert leftovers == [], f"left behind: {leftovers}"


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
    store_url = os.environ.get("PIPE_TEST_K8S_S3_URL", "s3://pipe-handoff/")
    yield {"api": api, "namespace": namespace, "image": image, "store": ObjectStore(store_url, endpoint),
           "store_url": store_url, "kubeconfig": kubeconfig, "endpoint": endpoint}
    core.delete_namespace(namespace)




def assert_a_second_machine_runs_it_as_remote_hits(docker_client: Any, pipeline: Path, first: dict[str, Any]) -> None:
    """`pipeline` (a file on the local executor) run with a state dir of its own, as on another machine: every
    stage a remote hit from run `first` (the `pipe show --json` of the cluster's run), its artifacts the same
    digests, and no container started."""
    from tests.e2e.helpers import containers_created, pipe, pipe_json

    state = pipeline.parent / "machine-b"
    since = time.time()
    second = pipe("run", pipeline, "--state-dir", str(state), timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert containers_created(docker_client, state, since) == 0
    shown = pipe_json("show", "latest", pipeline, "--state-dir", str(state))
    ran = {s["stage"]: s for s in first["stages"]}
    assert {s["stage"]: s["status"] for s in shown["stages"]} == dict.fromkeys(ran, "cached")
    assert all(s["reason"].startswith(f"cached (remote) from run {first['id']}, fetched ") for s in shown["stages"])
    for s in shown["stages"]:
        assert [(x["path"], x["digest"]) for x in s["artifacts"]] == \
            [(x["path"], x["digest"]) for x in ran[s["stage"]]["artifacts"]]
