"""A pipeline end to end on the real 3-node swarm through the CLI: stages on different nodes, outputs back on the
invoking host, a rerun fully cached, then the local executor reusing the same cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.contract.conftest import SWARM_HANDOFF, SWARM_HOST, SWARM_REGISTRY, SWARM_S3_NODE
from tests.e2e.helpers import pipe

NODE = "grep -m1 memory /proc/self/cgroup | cut -d/ -f2"  # pipe-nX: the cgroup parent of the node's daemon


def test_the_pipeline_runs_across_nodes_then_reruns_cached_then_locally_cached(
        s3: Any, swarm_image: str, make_pipeline: Any) -> None:
    path: Path = make_pipeline({
        "executor": {"kind": "swarm", "host": SWARM_HOST, "registry": SWARM_REGISTRY, "handoff_dir": SWARM_HANDOFF,
                     "store": {"url": s3.url("handoff"), "endpoint": s3.endpoint, "node_endpoint": SWARM_S3_NODE}},
        "stages": {
            "make": {"image": "pipe-busybox:latest", "inputs": ["data.txt"],
                     "constraints": ["node.labels.pipe.node==n2"],
                     "command": f"cat data.txt > /outputs/copy.txt; {NODE} > /outputs/node"},
            "use": {"image": "pipe-busybox:latest", "needs": ["make"], "constraints": ["node.labels.pipe.node==n3"],
                    "command": f"cp /inputs/make/copy.txt /outputs/; {NODE} > /outputs/node"},
        },
    }, files={"data.txt": "hello swarm\n"})
    root = path.parent
    done = pipe("run", "--json", cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {n: s["status"] for n, s in summary["stages"].items()} == {"make": "succeeded", "use": "succeeded"}
    runs = root / "runs" / summary["run_id"]
    assert (runs / "make" / "node").read_text().strip() == "pipe-n2"
    assert (runs / "use" / "node").read_text().strip() == "pipe-n3"
    assert (runs / "use" / "copy.txt").read_text() == "hello swarm\n"
    assert "on swarm the stage runs without no-new-privileges" in done.stderr
    again = pipe("run", "--json", cwd=root, timeout=600)
    assert again.returncode == 0, again.stderr
    assert {s["status"] for s in json.loads(again.stdout)["stages"].values()} == {"cached"}
    local = pipe("run", "--json", "--executor", "local", cwd=root, timeout=600)
    assert local.returncode == 0, local.stderr
    assert {s["status"] for s in json.loads(local.stdout)["stages"].values()} == {"cached"}
    assert yaml.safe_load(path.read_text())["executor"]["kind"] == "swarm"
