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
        s3: Any, swarm_image: str, make_pipeline: Any, tmp_path: Path) -> None:
    path: Path = make_pipeline({  # no store of its own: the hand-off goes through the remote (nodes reach it
        # at node_endpoint)
        "remote": {"url": s3.url("cache"), "endpoint": s3.endpoint},
        "executor": {"kind": "swarm", "host": SWARM_HOST, "registry": SWARM_REGISTRY, "handoff_dir": SWARM_HANDOFF,
                     "store": {"node_endpoint": SWARM_S3_NODE}},
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
    # --fetch final (the default): the final stage's outputs are on this host; make's went from n2 to n3
    # through the remote's blobs and never came here
    assert (runs / "use" / "node").read_text().strip() == "pipe-n3"
    assert (runs / "use" / "copy.txt").read_text() == "hello swarm\n"
    assert not (runs / "make").exists()
    assert summary["stages"]["make"]["cache_key"]
    pulled = pipe("pull", summary["run_id"], "--json", cwd=root, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert (runs / "make" / "node").read_text().strip() == "pipe-n2"  # `pipe pull RUN` brings any stage's
    assert (runs / "make" / "copy.txt").read_text() == "hello swarm\n"
    assert "on swarm the stage runs without no-new-privileges" in done.stderr
    # history rows complete: executor, node (a swarm hostname), task id, image digest, timings, exit, reason
    shown = json.loads(pipe("show", summary["run_id"], "--json", cwd=root).stdout)
    rows = {s["stage"]: s for s in shown["stages"]}
    assert {n: (r["executor"], r["node"]) for n, r in rows.items()} == {"make": ("swarm", "pipe-n2"),
                                                                         "use": ("swarm", "pipe-n3")}
    for r in rows.values():
        assert r["task_id"] and len(r["task_id"]) == 25, r  # a swarm task id
        assert r["image_id"].startswith("sha256:") and r["exit_code"] == 0 and r["status"] == "succeeded"
        assert r["started_at"] < r["finished_at"] and r["duration_s"] > 0
        assert r["reason"].startswith("ran: "), r  # why it ran (never ran), from the one decision
    assert rows["make"]["task_id"] != rows["use"]["task_id"]
    import time

    import docker as sdk

    manager = sdk.DockerClient(base_url=SWARM_HOST)
    since = time.time()
    again = pipe("run", "--json", cwd=root, timeout=600)
    assert again.returncode == 0, again.stderr
    assert {s["status"] for s in json.loads(again.stdout)["stages"].values()} == {"cached"}
    # cached stages are never submitted: the manager created no service at all during the rerun
    created = list(manager.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                                  filters={"type": "service", "event": "create"}))
    assert created == []
    # a fresh clone elsewhere (no runs/) on the local executor: every stage a remote hit, nothing runs
    import shutil

    clone = tmp_path / "clone"
    shutil.copytree(root, clone, ignore=shutil.ignore_patterns("runs"))
    dry = json.loads(pipe("run", "--dry-run", "--json", "--executor", "local", cwd=clone).stdout)
    assert {n: s["runs"] for n, s in dry["stages"].items()} == {"make": False, "use": False}, dry
    assert all(s.get("remote") for s in dry["stages"].values()), dry
    local = pipe("run", "--json", "--executor", "local", cwd=clone, timeout=600)
    assert local.returncode == 0, local.stderr
    ran = json.loads(local.stdout)
    assert {s["status"] for s in ran["stages"].values()} == {"cached"}
    assert (clone / "runs" / ran["run_id"] / "use" / "copy.txt").read_text() == "hello swarm\n"
    assert yaml.safe_load(path.read_text())["executor"]["kind"] == "swarm"


def test_retry_on_node_lost_runs_the_stage_again_elsewhere_and_leaves_nothing(
        s3: Any, swarm_image: str, make_pipeline: Any) -> None:
    import docker as sdk

    from tests.conftest import wait_for
    from tests.contract.conftest import SWARM_NODES, kill_node, node_of, start_node
    from tests.e2e.helpers import start_pipe

    path: Path = make_pipeline({
        "executor": {"kind": "swarm", "host": SWARM_HOST, "registry": SWARM_REGISTRY, "handoff_dir": SWARM_HANDOFF,
                     "store": {"url": s3.url("handoff"), "endpoint": s3.endpoint, "node_endpoint": SWARM_S3_NODE}},
        "stages": {"work": {"image": "pipe-busybox:latest", "constraints": ["node.role==worker"],
                            "retries": 1, "retry_delay": "1s", "retry_on": ["node_lost"],
                            "command": f"sleep 12; {NODE} > /outputs/node"}},
    })
    root = path.parent
    owner = str((root / "runs").resolve())
    clients = [sdk.DockerClient(base_url=u) for u in SWARM_NODES]
    proc = start_pipe("run", "--json", cwd=root)
    try:
        victim = wait_for(lambda: node_of(clients, owner), timeout=180, what="the stage's first attempt running")
        kill_node(victim)
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            start_node(victim)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    summary = json.loads(out[out.index("{"):])
    stage = summary["stages"]["work"]
    assert (stage["status"], stage["attempts"]) == ("succeeded", 2), stage
    other = ({"n2", "n3"} - {victim}).pop()
    runs = root / "runs" / summary["run_id"]
    assert (runs / "work" / "node").read_text().strip() == f"pipe-{other}"
    shown = json.loads(pipe("show", "latest", "--json", cwd=root).stdout)
    row = next(s for s in shown["stages"] if s["stage"] == "work")
    assert (row["executor"], row["node"], row["attempts"]) == ("swarm", f"pipe-{other}", 2)
    # the lost node, back, runs the clean task of its hand-off folder; the next command sweeps the rest
    manager = sdk.DockerClient(base_url=SWARM_HOST)
    flt = {"label": [f"dev.pipe.pipeline={owner}"]}

    def settled() -> bool:
        return all(t["Status"]["State"] in ("complete", "failed", "shutdown") for s in manager.api.services(filters=flt)
                   for t in manager.api.tasks(filters={"service": s["ID"]}))

    wait_for(settled, timeout=60, what="the clean task on the node that came back")
    again = pipe("run", "--json", cwd=root, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["stages"]["work"]["status"] == "cached"
    left = [s["Spec"]["Name"] for s in manager.api.services(filters=flt)]
    left += [s["Spec"]["Name"] for s in manager.api.secrets(filters=flt)]
    left += [n["Name"] for n in manager.api.networks(filters=flt)]
    for client in clients:
        left += [c["Id"] for c in client.api.containers(all=True, filters={"label": f"dev.pipe.pipeline={owner}"})]
    for node_dir in sorted(Path(SWARM_HANDOFF).parent.glob("local-n*")):
        left += [str(p) for p in node_dir.rglob("*") if summary["run_id"] in str(p)]
    assert left == []


def test_a_sigkill_of_pipe_mid_stage_then_the_next_command_leaves_nothing_on_any_node(
        s3: Any, swarm_image: str, make_pipeline: Any) -> None:
    import signal

    import docker as sdk

    from tests.conftest import wait_for
    from tests.contract.conftest import SWARM_NODES, node_of
    from tests.e2e.helpers import start_pipe

    path: Path = make_pipeline({
        "executor": {"kind": "swarm", "host": SWARM_HOST, "registry": SWARM_REGISTRY, "handoff_dir": SWARM_HANDOFF,
                     "store": {"url": s3.url("handoff"), "endpoint": s3.endpoint, "node_endpoint": SWARM_S3_NODE}},
        "stages": {"long": {"image": "pipe-busybox:latest", "command": "sleep 300"},
                   "quick": {"image": "pipe-busybox:latest", "command": "echo ok > /outputs/ok"}},
    })
    root = path.parent
    owner = str((root / "runs").resolve())
    clients = [sdk.DockerClient(base_url=u) for u in SWARM_NODES]
    proc = start_pipe("run", "--stage", "long", cwd=root)
    try:
        wait_for(lambda: node_of(clients, owner), timeout=180, what="the long stage running on a node")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    manager = sdk.DockerClient(base_url=SWARM_HOST)
    flt = {"label": [f"dev.pipe.pipeline={owner}"]}
    assert manager.api.services(filters=flt)  # the killed pipe left its run's services behind
    after = pipe("run", "--stage", "quick", cwd=root, timeout=600)  # the next command
    assert after.returncode == 0, after.stderr

    def left() -> list[str]:
        found = [s["Spec"]["Name"] for s in manager.api.services(filters=flt)]
        found += [s["Spec"]["Name"] for s in manager.api.secrets(filters=flt)]
        found += [n["Name"] for n in manager.api.networks(filters=flt)]
        for client in clients:
            found += [c["Id"] for c in client.api.containers(all=True, filters={"label": f"dev.pipe.pipeline={owner}"})]
        for node_dir in sorted(Path(SWARM_HANDOFF).parent.glob("local-n*")):
            found += [str(p) for p in node_dir.iterdir()]
        return found

    wait_for(lambda: not left(), timeout=30, what="nothing left on any node")  # the node removes its container


def test_fetch_none_leaves_every_output_in_the_remote_and_an_entry_missing_a_blob_runs_again(
        s3: Any, swarm_image: str, make_pipeline: Any) -> None:
    from orchestrator.hashing import hash_bytes
    from orchestrator.remote import blob_key

    path: Path = make_pipeline({
        "remote": {"url": s3.url("cache"), "endpoint": s3.endpoint},
        "executor": {"kind": "swarm", "host": SWARM_HOST, "registry": SWARM_REGISTRY, "handoff_dir": SWARM_HANDOFF,
                     "store": {"node_endpoint": SWARM_S3_NODE}},
        "stages": {
            "score": {"image": "pipe-busybox:latest", "metrics": "m.json", "gate": {"metric": "score", "min": 0.5},
                      "command": "echo 41 > /outputs/n; echo '{\"score\": 0.9}' > /outputs/m.json"},
            "use": {"image": "pipe-busybox:latest", "needs": ["score"], "command": "cp /inputs/score/n /outputs/"},
        },
    })
    root = path.parent
    done = pipe("run", "--fetch", "none", "--json", cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)
    assert {n: s["status"] for n, s in first["stages"].items()} == {"score": "succeeded", "use": "succeeded"}
    assert [first["stages"][n]["outputs_path"] for n in ("score", "use")] == [
        str((root / "runs" / first["run_id"] / n).resolve()) for n in ("score", "use")]
    assert not any(Path(first["stages"][n]["outputs_path"]).exists() for n in ("score", "use"))
    # the metrics (and so the gate) were read from the store: the metrics file alone came to this host
    assert first["stages"]["score"]["metrics"] == {"score": 0.9}
    # a blob of score's remote entry goes missing: a remote hit left in the store must be whole, so score runs again
    s3.raw.delete_object(Bucket=s3.name, Key="cache/" + blob_key(hash_bytes(b"41\n")))
    again = pipe("run", "--json", cwd=root, timeout=600)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert {n: s["status"] for n, s in second["stages"].items()} == {"score": "succeeded", "use": "cached"}, second
    assert "lacks a blob" in again.stderr
    assert (root / "runs" / second["run_id"] / "use" / "n").read_text() == "41\n"  # final: fetched
    assert not (root / "runs" / second["run_id"] / "score").exists()
    # the entry was filed whole again: --fetch all now brings every stage's outputs here, running nothing
    third = pipe("run", "--fetch", "all", "--json", cwd=root, timeout=600)
    assert third.returncode == 0, third.stderr
    ran = json.loads(third.stdout)
    assert {s["status"] for s in ran["stages"].values()} == {"cached"}
    assert (root / "runs" / ran["run_id"] / "score" / "n").read_text() == "41\n"
    assert (root / "runs" / ran["run_id"] / "use" / "n").read_text() == "41\n"
    bad = pipe("run", "--fetch", "some", cwd=root)
    assert bad.returncode == 2 and "unknown --fetch 'some': use none, final or all" in bad.stderr
