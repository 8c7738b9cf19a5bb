#!/usr/bin/env python3
"""Swarm executor costs on the private cluster of scripts/cluster.sh, as ratios measured in the same run:

  floor       a bare Swarm SDK task (`true`): create service, wait until terminal, read logs, remove
  executor    SwarmExecutor.run of the same `true` (hand-off store check, fetch task, stage task on an internal
              network of its own, push task), no mounts
  net         the same with network: true (no per-task internal network)
  input       a stage with a 20 MB read-only input folder and a writable /outputs (pack, upload, fetch, push back)
  out_fetch   a stage writing 20 MB in 20 files to /outputs: hashed on the node, sent to blobs/ with a listing,
              then downloaded here (--fetch all, or a final stage)
  out_stay    the same, left in the store (--fetch none, or a stage that is not final): the listing alone comes
  wide        K (default 50) independent 1 s stages at once (K threads, 0.25 CPU reserved each), on 3 nodes against
              all pinned to one node: the scheduler's reservations bound each node to 8 at a time (2 CPUs)

Usage: set the env of scripts/cluster.sh and scripts/s3.sh, then `python3 bench/swarm_overhead.py [-n 3] [-k 50]`.
Writes bench/SWARM_RESULTS.md (or --results). Leaves nothing: every service is labelled and removed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
import docker
from docker.types import ContainerSpec as SwarmContainerSpec
from docker.types import RestartPolicy, ServiceMode, TaskTemplate

from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE, LABEL_RUN, LABEL_STAGE, ContainerSpec, Mount
from orchestrator.spec import Pipeline
from orchestrator.swarm_backend import SwarmBackend

E = os.environ


def floor(client: docker.DockerClient, image: str) -> float:
    t0 = time.monotonic()
    template = TaskTemplate(SwarmContainerSpec(image, command=["true"]), restart_policy=RestartPolicy("none"))
    sid = client.api.create_service(template, mode=ServiceMode("replicated", 1), labels={LABEL_MANAGED: "1"})["ID"]
    while not any(t["Status"]["State"] in ("complete", "failed", "rejected")
                  for t in client.api.tasks(filters={"service": sid})):
        time.sleep(0.05)
    b"".join(client.api.service_logs(sid, stdout=True, stderr=True))
    client.api.remove_service(sid)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("-k", type=int, default=50)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("SWARM_RESULTS.md"))
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=E["PIPE_TEST_S3_ACCESS_KEY"], AWS_SECRET_ACCESS_KEY=E["PIPE_TEST_S3_SECRET_KEY"],
                      AWS_EC2_METADATA_DISABLED="true")
    bucket = f"pipe-bench-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=E["PIPE_TEST_S3_ENDPOINT"], region_name="us-east-1", verify=False).create_bucket(
        Bucket=bucket)
    pipeline = Pipeline.model_validate({"stages": {"a": {"image": "pipe-busybox:latest"}}, "executor": {
        "kind": "swarm", "host": E["PIPE_TEST_SWARM_HOST"], "registry": E["PIPE_TEST_SWARM_REGISTRY"],
        "handoff_dir": E["PIPE_TEST_SWARM_HANDOFF_DIR"],
        "store": {"url": f"s3://{bucket}/p/", "endpoint": E["PIPE_TEST_S3_ENDPOINT"],
                  "node_endpoint": E["PIPE_TEST_SWARM_S3_NODE_ENDPOINT"]}}})
    backend = SwarmBackend(pipeline)
    client = backend._client
    image_id = str(client.images.get("pipe-busybox:latest").id)
    ref = backend.publish(image_id, "pipe/busybox")
    backend._refs[image_id] = ref
    executor = backend.executor()
    owner = tempfile.mkdtemp(prefix="pipe-bench-swarm-")

    def spec(name: str, command: str, **kw: object) -> ContainerSpec:
        labels = {LABEL_MANAGED: "1", LABEL_PIPELINE: owner, LABEL_RUN: "bench", LABEL_STAGE: name}
        return ContainerSpec(name=name, image_id=image_id, command=("sh", "-c", command), labels=labels,
                             user=f"{os.getuid()}:{os.getgid()}", **kw)  # type: ignore[arg-type]

    def timed(s: ContainerSpec) -> float:
        t0 = time.monotonic()
        result = executor.run(s, lambda _: None)
        assert result.outcome.value == "succeeded", result.reason
        return time.monotonic() - t0

    data = Path(owner) / "data"
    data.mkdir()
    for i in range(4):
        (data / f"f{i}").write_bytes(os.urandom(5 << 20))
    rows: dict[str, list[float]] = {"floor": [], "executor": [], "net": [], "input": [], "out_fetch": [],
                                    "out_stay": []}
    write = "for i in $(seq 20); do head -c 1048576 /dev/urandom > /outputs/f$i; done"
    for _ in range(args.n):  # in turns, so that the machine's load moves all rows alike
        rows["floor"].append(floor(client, ref))
        rows["executor"].append(timed(spec("noop", "true")))
        rows["net"].append(timed(spec("noop", "true", network=True)))
        out = Path(tempfile.mkdtemp(dir=owner))
        rows["input"].append(timed(spec("io", "cat /inputs/d/* > /dev/null; echo x > /outputs/o",
                                        mounts=(Mount(out, "/outputs", False), Mount(data, "/inputs/d")))))
        for row, fetch in (("out_fetch", True), ("out_stay", False)):
            out = Path(tempfile.mkdtemp(dir=owner))
            rows[row].append(timed(spec("out", write, mounts=(Mount(out, "/outputs", False),), fetch_outputs=fetch)))

    def wide(constraint: str | None) -> float:
        backend._stage_constraints.clear()
        if constraint:
            backend._stage_constraints.update({f"w{i}": (constraint,) for i in range(args.k)})
        ex = backend.executor()
        threads = [threading.Thread(target=lambda i=i: ex.run(spec(f"w{i}", "sleep 1", cpus=0.25), lambda _: None))
                   for i in range(args.k)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0

    w1 = wide("node.labels.pipe.node==n2")
    w3 = wide(None)
    med = {k: statistics.median(v) for k, v in rows.items()}
    load = os.getloadavg()[0]
    text = f"""# Swarm executor: measured costs (bench/swarm_overhead.py, -n {args.n}, -k {args.k})

On the private 3-node cluster of scripts/cluster.sh (3 dockerds on one 2-core machine), load average {load:.1f}.
Medians of {args.n} runs taken in turns; ratios are against the floor of the same run.

| row | seconds | against floor |
| --- | --- | --- |
| floor: bare Swarm SDK task (create, wait, logs, remove) | {med['floor']:.2f} | 1.0 |
| executor: one stage, no mounts (fetch task, stage task on its own internal network, push task) | {med['executor']:.2f} | {med['executor'] / med['floor']:.1f} |
| the same with `network: true` (no per-task network) | {med['net']:.2f} | {med['net'] / med['floor']:.1f} |
| a stage with a 20 MB input folder and /outputs (pack, upload, fetch, push back) | {med['input']:.2f} | {med['input'] / med['floor']:.1f} |
| a stage writing 20 MB in 20 files, fetched here (b3sum, blobs, listing, download) | {med['out_fetch']:.2f} | {med['out_fetch'] / med['floor']:.1f} |
| the same, left in the store (`--fetch none`, or not a final stage) | {med['out_stay']:.2f} | {med['out_stay'] / med['floor']:.1f} |

Wide DAG: {args.k} independent `sleep 1` stages at once (0.25 CPU each): all on one node {w1:.1f} s, on 3 nodes
{w3:.1f} s (ratio 3 nodes / 1 node = {w3 / w1:.2f}). The three nodes share the same 2 cores, so spreading buys
little here beyond the per-node daemons working in parallel, but each node's CPU reservations hold at most 8 such
stages at once, so 3 nodes take three times as many at a time.
"""
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
