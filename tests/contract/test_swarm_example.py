"""The example pipeline (pipeline.yaml, stages/, data/ at the repository's root) on the real 3-node swarm: end to
end with its stages on different nodes, then fully cached, then on a second machine (its own state dir) on the
local executor as remote hits that start no container.

The manager builds the images (as on a real swarm), but its namespace has no route out, so apt cannot reach the
archive. As a team would seed a new manager, pipe first builds them on this machine's engine and they are loaded
onto the manager (`docker save | docker load`); the manager's builds take them as cache sources, so every step is
cached and the image ids are the same on both engines (which the local run's remote hits prove)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.contract.conftest import (
    SWARM_HANDOFF,
    SWARM_HOST,
    SWARM_REGISTRY,
    SWARM_S3_NODE,
    assert_a_second_machine_runs_it_as_remote_hits,
)
from tests.e2e.helpers import pipe, pipe_json
from tests.e2e.test_example import example  # noqa: F401  (the fixture)

STAGES = ("data", "train", "evaluate", "predict")
PLACED = {"data": "n2", "train": "n3", "evaluate": "n1", "predict": "n2"}  # every hand-off crosses nodes


def _load_onto_manager(refs: list[str]) -> None:
    save = subprocess.Popen(["docker", "save", *refs], stdout=subprocess.PIPE)
    subprocess.run(["docker", "-H", str(SWARM_HOST), "load", "-q"], stdin=save.stdout, check=True,
                   capture_output=True, timeout=900)
    assert save.wait(60) == 0


def test_the_example_runs_across_nodes_then_cached_then_locally_as_remote_hits(
        s3: Any, swarm_image: str, docker_client: Any, example: Path) -> None:  # noqa: F811
    import docker as sdk

    root = example.parent
    spec = yaml.safe_load(example.read_text())
    spec.pop("serve")  # serving is the local engine's (issue 18), not this test's
    spec["remote"] = {"url": s3.url("example"), "endpoint": s3.endpoint}
    local_spec = json.loads(json.dumps(spec))
    for name, where in PLACED.items():
        spec["stages"][name]["constraints"] = [f"node.labels.pipe.node=={where}"]
    spec["executor"] = {"kind": "swarm", "host": SWARM_HOST, "registry": SWARM_REGISTRY, "handoff_dir": SWARM_HANDOFF,
                        "store": {"node_endpoint": SWARM_S3_NODE}}
    b = ["--state-dir", str(root / "machine-b")]
    example.write_text(yaml.safe_dump(local_spec, sort_keys=False))
    assert pipe("validate", example, *b, timeout=1500).returncode == 0  # pipe builds the four images here
    host_ids = {s: docker_client.images.get(f"pipe/diabetes-{s}:latest").id for s in STAGES}
    _load_onto_manager(["debian:bookworm-slim", *(f"pipe/diabetes-{s}:latest" for s in STAGES)])

    example.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = pipe("run", example, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    first = pipe_json("show", "latest", example)
    rows = {s["stage"]: s for s in first["stages"]}
    assert {n: (r["status"], r["executor"], r["node"]) for n, r in rows.items()} == {
        n: ("succeeded", "swarm", f"pipe-{where}") for n, where in PLACED.items()}
    assert {n: r["image_id"] for n, r in rows.items()} == host_ids  # built on the manager: every step cached
    assert 0.3 < rows["evaluate"]["metrics"]["r2"] < 0.7, rows["evaluate"]["metrics"]
    outputs = {n: Path(r["outputs_path"]) for n, r in rows.items()}
    new_rows = (root / "data" / "new" / "rows.csv").read_text().strip().splitlines()
    # --fetch final: predict's outputs are on this host; the others stayed in the remote (evaluate's metrics
    # were read from there), and `pipe pull` brings them
    assert len((outputs["predict"] / "predictions.csv").read_text().strip().splitlines()) == len(new_rows)
    assert [n for n in STAGES if outputs[n].exists()] == ["predict"]
    assert pipe("pull", first["id"], example, timeout=600).returncode == 0
    assert (outputs["evaluate"] / "pred_vs_actual.png").read_bytes()[:4] == b"\x89PNG"
    assert all(outputs[n].is_dir() for n in STAGES)

    manager = sdk.DockerClient(base_url=SWARM_HOST)
    since = time.time()
    again = pipe("run", example, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {s["stage"]: s["status"] for s in pipe_json("show", "latest", example)["stages"]} == dict.fromkeys(
        STAGES, "cached")
    created = list(manager.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                                  filters={"type": "service", "event": "create"}))
    assert created == []  # cached stages are never submitted

    example.write_text(yaml.safe_dump(local_spec, sort_keys=False))  # a second machine on the local executor
    assert_a_second_machine_runs_it_as_remote_hits(docker_client, example, first)
