"""The example pipeline (pipeline.yaml, stages/, data/ at the repository's root) on the test cluster (marker k8s):
end to end as batch/v1 Jobs, then fully cached, then on a second machine (its own state dir) on the local executor
as remote hits that start no container. The images are built by pipe from the stages' Dockerfiles on the local
engine and loaded into the node's engine (the cluster has no registry: pods run them by id, pull policy Never)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.contract.conftest import NODE_DOCKER, assert_a_second_machine_runs_it_as_remote_hits
from tests.e2e.helpers import pipe, pipe_json
from tests.e2e.test_example import example  # noqa: F401  (the fixture)

pytestmark = pytest.mark.k8s
STAGES = ("data", "train", "evaluate", "predict")


def _load_into_node(image_ids: list[str]) -> None:
    """`docker save` from the local engine into the node's engine (as scripts/k8s/up.sh seeds pipe-busybox)."""
    assert NODE_DOCKER, "PIPE_TEST_K8S_NODE_DOCKER: the node's engine (scripts/test.sh passes it)"
    save = subprocess.Popen(["docker", "save", *image_ids], stdout=subprocess.PIPE)
    subprocess.run(["docker", "-H", NODE_DOCKER, "load", "-q"], stdin=save.stdout, check=True,
                   capture_output=True, timeout=600)
    assert save.wait(60) == 0


def test_the_example_runs_on_the_cluster_then_cached_then_locally_as_remote_hits(
        cluster: dict[str, Any], docker_client: Any, example: Path, tmp_path: Path) -> None:  # noqa: F811
    spec = yaml.safe_load(example.read_text())
    spec.pop("serve")  # serving is the local engine's (issue 18), not this test's
    spec["executor"] = {"kind": "kubernetes", "namespace": cluster["namespace"], "handoff": "s3://pipe-handoff/ex/",
                        "endpoint": cluster["endpoint"], "pending_timeout": "120s"}
    spec["remote"] = {"url": f"s3://pipe-handoff/team-{uuid.uuid4().hex[:8]}/", "endpoint": cluster["endpoint"]}
    example.write_text(yaml.safe_dump(spec, sort_keys=False))
    tmp_path.chmod(0o755)
    (tmp_path / "project").chmod(0o755)
    env = {"KUBECONFIG": cluster["kubeconfig"]}
    a = ["--state-dir", str(example.parent / "machine-a")]

    assert pipe("validate", example, *a[:2], env=env, timeout=1500).returncode == 0  # builds the four images
    ids = [docker_client.images.get(f"pipe/diabetes-{s}:latest").id for s in STAGES]
    _load_into_node(sorted(set(ids)))

    done = pipe("run", example, *a, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "pushed 4 cache entries" in done.stdout
    first = pipe_json("show", "latest", example, *a)
    assert {s["stage"]: (s["status"], s["executor"]) for s in first["stages"]} == dict.fromkeys(
        STAGES, ("succeeded", "kubernetes"))
    by_stage = {s["stage"]: s for s in first["stages"]}
    assert 0.3 < by_stage["evaluate"]["metrics"]["r2"] < 0.7, by_stage["evaluate"]["metrics"]
    outputs = {s["stage"]: Path(s["outputs_path"]) for s in first["stages"]}
    assert (outputs["evaluate"] / "pred_vs_actual.png").read_bytes()[:4] == b"\x89PNG"  # unpacked from the pod
    rows = (example.parent / "data" / "new" / "rows.csv").read_text().strip().splitlines()
    assert len((outputs["predict"] / "predictions.csv").read_text().strip().splitlines()) == len(rows)

    again = pipe("run", example, *a, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {s["stage"]: s["status"] for s in pipe_json("show", "latest", example, *a)["stages"]} == dict.fromkeys(
        STAGES, "cached")

    local = yaml.safe_load(example.read_text())
    local.pop("executor")  # the local executor, on a second machine: its own cache, runs and pipe.db
    example.write_text(yaml.safe_dump(local, sort_keys=False))
    assert_a_second_machine_runs_it_as_remote_hits(docker_client, example, first)
