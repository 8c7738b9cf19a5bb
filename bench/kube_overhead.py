#!/usr/bin/env python3
"""Kubernetes executor costs per stage on the test cluster of scripts/k8s/up.sh, as ratios against a floor
measured in the same run, in turns with it (a, b, a, b, ...):

  floor       the bare kubernetes client: create a batch/v1 Job (busybox `true`, backoffLimit 0, restartPolicy
              Never), poll it until it succeeded, read its pod's log, delete it (Foreground propagation)
  executor    KubernetesExecutor.run of the same `true`, no mounts (a Secret, the Job, the pending watch, `logs -f`,
              the outcome from the pod's status, deletion of Job and Secret)
  io          a stage with a 5 MB input folder and /outputs (tar up, init container fetch, upload container,
              base64 back, unpack)

Run it inside the cluster's namespace (everything it talks to is there):
  ip netns exec pipe-k8s env KUBECONFIG=$STATE/admin.kubeconfig PIPE_K8S_S3_ENDPOINT=http://10.244.0.1:9000 \\
      python3 bench/kube_overhead.py [-n 5]
Writes bench/KUBE_RESULTS.md (or --results). Uses a namespace of its own and deletes it (and with it every Job,
pod and Secret) at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client as k8s

from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE, LABEL_RUN, LABEL_STAGE, ContainerSpec, Mount
from orchestrator.kube_executor import KubernetesExecutor, KubeSettings, connect
from orchestrator.objectstore import ObjectStore

POLL_S = 0.1


def floor(batch: Any, core: Any, ns: str, image: str) -> float:
    name = f"floor-{secrets.token_hex(4)}"
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {LABEL_MANAGED: "1"}},
           "spec": {"backoffLimit": 0, "template": {"spec": {
               "restartPolicy": "Never", "automountServiceAccountToken": False,
               "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never", "command": ["true"]}]}}}}
    t0 = time.monotonic()
    batch.create_namespaced_job(ns, job)
    while not (batch.read_namespaced_job_status(name, ns).status.succeeded or 0):
        time.sleep(POLL_S)
    pod = core.list_namespaced_pod(ns, label_selector=f"job-name={name}").items[0].metadata.name
    core.read_namespaced_pod_log(pod, ns, container="main")
    batch.delete_namespaced_job(name, ns, body=k8s.V1DeleteOptions(propagation_policy="Foreground"))
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("KUBE_RESULTS.md"))
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "pipe")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "pipe-secret")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    api = connect(kubeconfig=os.environ.get("KUBECONFIG"))
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    ns = f"pipe-bench-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": ns}})
    try:
        deadline = time.monotonic() + 60
        while not any(a.metadata.name == "default" for a in core.list_namespaced_service_account(ns).items):
            assert time.monotonic() < deadline, "the namespace's default ServiceAccount never came"
            time.sleep(0.2)
        image = subprocess.check_output(["docker", "image", "inspect", "-f", "{{.Id}}", "pipe-busybox:latest"],
                                        text=True).strip()
        store = ObjectStore("s3://pipe-handoff/bench/", os.environ["PIPE_K8S_S3_ENDPOINT"])
        executor = KubernetesExecutor(api, KubeSettings(namespace=ns, handoff_url="s3://pipe-handoff/bench/",
                                                        agent_image=image, pending_timeout_s=120), store)
        owner = tempfile.mkdtemp(prefix="pipe-bench-k8s-")
        os.chmod(owner, 0o755)

        def spec(name: str, command: str, **kw: Any) -> ContainerSpec:
            labels = {LABEL_MANAGED: "1", LABEL_PIPELINE: owner, LABEL_RUN: "bench", LABEL_STAGE: name}
            return ContainerSpec(name=name, image_id=image, command=("sh", "-c", command), labels=labels,
                                 user=f"{os.getuid()}:{os.getgid()}", **kw)

        def timed(s: ContainerSpec) -> float:
            t0 = time.monotonic()
            result = executor.run(s, lambda _: None)
            assert result.outcome.value == "succeeded", result.reason
            return time.monotonic() - t0

        data = Path(owner) / "data"
        data.mkdir()
        for i in range(5):
            (data / f"f{i}").write_bytes(os.urandom(1 << 20))
        rows: dict[str, list[float]] = {"floor": [], "executor": [], "io": []}
        floor(batch, core, ns, image)  # warm-up: the first pod of a namespace, connections
        for _ in range(args.n):  # in turns, so that the machine's load moves all rows alike
            rows["floor"].append(floor(batch, core, ns, image))
            rows["executor"].append(timed(spec("noop", "true")))
            out = Path(tempfile.mkdtemp(dir=owner))
            rows["io"].append(timed(spec("io", "cat /inputs/d/* > /dev/null; cp /inputs/d/f0 /outputs/o",
                                         mounts=(Mount(out, "/outputs", False), Mount(data, "/inputs/d")))))
    finally:
        core.delete_namespace(ns)
    med = {k: statistics.median(v) for k, v in rows.items()}
    spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in rows.items()}
    load = os.getloadavg()[0]
    text = f"""# Kubernetes executor: measured costs (bench/kube_overhead.py, -n {args.n})

On the single-node Kubernetes 1.20 of scripts/k8s/up.sh (a kubelet on a private dockerd, one 2-core machine shared
with other work), load average {load:.1f} at the end. Medians of {args.n} runs taken in turns (min-max in brackets);
ratios are against the floor of the same run.

| row | seconds | against floor |
| --- | --- | --- |
| floor: bare kubernetes client Job (create, poll until succeeded, read log, delete) | {med['floor']:.2f} ({spread['floor']}) | 1.0 |
| executor: one stage `true`, no mounts (Secret, Job, pending watch, `logs -f`, status, delete) | {med['executor']:.2f} ({spread['executor']}) | {med['executor'] / med['floor']:.2f} |
| a stage with a 5 MB input folder and /outputs (tar, fetch init container, upload container, unpack) | {med['io']:.2f} ({spread['io']}) | {med['io'] / med['floor']:.2f} |

Per-stage overhead of the executor over the bare client: {med['executor'] - med['floor']:.2f} s \
({(med['executor'] - med['floor']) / med['floor'] * 100:.0f} % of the floor); the hand-off (init and upload \
containers, store round trips) adds {med['io'] - med['executor']:.2f} s for 5 MB in and 1 MB out.
"""
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
