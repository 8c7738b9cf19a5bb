"""A ContainerSpec as Kubernetes objects (batch/v1 Job, core/v1 Secret), and a Job's pod read back as an outcome.

Pure: plain dicts in the API's own JSON shape (the client sends them as they are), no `kubernetes` import, so the
translation is unit-tested everywhere. kube_executor.py sends these and watches the pod.

One pod per stage attempt (docs/kubernetes.md):
  init `fetch`  (agent image)  downloads each input tar (presigned GET) into the `in` emptyDir
  `main`        (stage image)  the stage; inputs read-only (subPath of `in`), outputs in writable emptyDirs
  `upload`      (agent image)  waits for pipe's go-object (put only after `main` exited 0), then tars each output
                               emptyDir and posts it (presigned POST) to the object store
The agent never holds store credentials: only URLs signed for its own keys, delivered in the attempt's Secret.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE, LABEL_RUN, LABEL_STAGE, ContainerSpec, Mount

AGENT_ROOT = "/var/run/pipe-agent"  # the agent's folders inside the init and upload containers
SECRETS_TARGET = "/run/secrets"
MAIN, FETCH, UPLOAD = "main", "fetch", "upload"
ANNOTATION_PIPELINE = "dev.pipe/pipeline"  # the full owner path (a label value holds only 63 characters)
AGENT_CPU = "100m"
AGENT_MEMORY = 256 * 1024**2
GO_POLL_S = 0.5
NOBODY = 65534
# What the local sandbox gives that a pod cannot get through the stable API: said with each attempt's result
# (ExecResult.warnings, recorded in history and printed), never silent (docs/kubernetes.md, "Not enforced")
GAPS = {
    "init": "an init process (no pod field for one: the stage's command is PID 1 and reaps no stray children)",
    "network": "network isolation (network: false; a pod always has the cluster's network: only a NetworkPolicy "
               "of the cluster confines it)",
    "pids": "a pids limit (no pod field for one: the kubelet's --pod-max-pids is node-wide)",
}
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Placement:
    """Where a stage's pod may run: `kubernetes: {node_selector, tolerations}` on the stage."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Handoff:
    """The mounts of one attempt as object-store transfers: inputs (read-only mounts) go in through `fetch`,
    outputs (writable mounts) come back through `upload`. `file_inputs` marks inputs that are single files."""

    inputs: tuple[Mount, ...]
    outputs: tuple[Mount, ...]
    file_inputs: frozenset[int] = frozenset()

    @staticmethod
    def of(spec: ContainerSpec, is_file: Sequence[bool]) -> Handoff:
        ins = tuple(m for m in spec.mounts if m.read_only)
        flags = [f for m, f in zip(spec.mounts, is_file, strict=True) if m.read_only]
        return Handoff(ins, tuple(m for m in spec.mounts if not m.read_only),
                       frozenset(i for i, f in enumerate(flags) if f))


def sandbox_gaps(spec: ContainerSpec) -> tuple[str, ...]:
    """The GAPS keys that apply to `spec`: what its sandbox lacks as a pod."""
    return ("init", *(() if spec.network else ("network",)), *(("pids",) if spec.pids is not None else ()))


def sandbox_warning(spec: ContainerSpec) -> str:
    """One line: what `spec`'s sandbox lacks on Kubernetes."""
    return "on kubernetes the stage runs without " + "; ".join(GAPS[g] for g in sandbox_gaps(spec))


def label_value(text: str) -> str:
    """`text` when Kubernetes takes it as a label value (63 characters of [A-Za-z0-9-_.]), else a stable hash."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def dns_name(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 label (Job, Secret and pod names) made of `parts`."""
    text = "-".join(re.sub(r"[^a-z0-9-]+", "-", p.lower()).strip("-") for p in parts if p)
    return text[:limit].rstrip("-") or "pipe"


def kube_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """pipe's labels as Kubernetes labels: the owner, run and stage; values hashed where they do not fit."""
    keep = (LABEL_MANAGED, LABEL_PIPELINE, LABEL_RUN, LABEL_STAGE)
    out = {k: label_value(v) for k, v in labels.items() if k in keep}
    out[LABEL_MANAGED] = "1"
    return out


def owner_selector(owner: str) -> str:
    return f"{LABEL_MANAGED}=1,{LABEL_PIPELINE}={label_value(owner)}"


def pull_policy(image: str) -> str:
    """Never for a bare image id (an image the node already holds: `sha256:...`); IfNotPresent for a registry
    reference pinned by digest (`registry/repo@sha256:...`), which the node pulls once."""
    return "Never" if image.startswith("sha256:") else "IfNotPresent"


def quantity_cpu(cpus: float) -> str:
    return f"{max(1, math.ceil(cpus * 1000))}m"


def _owner_ids(user: str | None) -> tuple[int, int] | None:
    if user is None:
        return None
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or not (gid or uid).isdigit():
        return None
    return int(uid), int(gid or uid)


def _hardened(owner: tuple[int, int] | None) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "runAsNonRoot": owner is None or owner[0] != 0,
    }
    if owner is not None:
        ctx["runAsUser"], ctx["runAsGroup"] = owner
    return ctx


def _resources(cpus: float | None, memory: int | None, gpus: int = 0) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if cpus is not None:
        amounts["cpu"] = quantity_cpu(cpus)
    if memory is not None:
        amounts["memory"] = str(memory)
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}  # equal: Guaranteed QoS, no overcommit


def fetch_script(handoff: Handoff) -> str:
    """The init container's script: each input's tar, by presigned GET, unpacked into its folder of `in`."""
    lines = ["set -eu", f"A={AGENT_ROOT}"]
    for i in range(len(handoff.inputs)):
        lines += [f"mkdir -p $A/in/{i}", f'wget -q -O - "$(cat $A/cfg/in-{i}.url)" | tar -x -C $A/in/{i}']
    return "\n".join(lines) + "\n"


def upload_script(handoff: Handoff) -> str:
    """The upload container's script: wait for the go-object, then post each output folder as one tar. The form
    head and tail (fields of the presigned POST) were written by pipe, so the agent only concatenates. The tar
    goes base64-encoded: busybox wget sends a --post-file up to its first NUL byte (strlen), and holds it in
    memory, so an output folder is bounded by AGENT_MEMORY (docs/kubernetes.md)."""
    lines = ["set -eu", f"A={AGENT_ROOT}",
             f'until wget -q -O $A/work/go "$(cat $A/cfg/go.url)" 2>/dev/null; do sleep {GO_POLL_S}; done']
    for i in range(len(handoff.outputs)):
        lines += [f"tar -c -C $A/out/{i} . | base64 > $A/work/out.tar",
                  f"cat $A/cfg/out-{i}.head $A/work/out.tar $A/cfg/out-{i}.tail > $A/work/body",
                  (f'wget -q -O /dev/null --header "Content-Type: $(cat $A/cfg/out-{i}.type)" '
                   f'--post-file $A/work/body "$(cat $A/cfg/out-{i}.url)"'),
                  "rm -f $A/work/body $A/work/out.tar"]
    return "\n".join(lines) + "\n"


def job_manifest(
    spec: ContainerSpec,
    *,
    name: str,
    image: str,
    agent_image: str,
    handoff: Handoff,
    placement: Placement = Placement(),
    owner: str = "",
    agent_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """The batch/v1 Job of one attempt. pipe owns retries (backoffLimit 0, restartPolicy Never); the deadline is
    the stage's timeout; secrets and agent URLs are only in the Secret `name`, never in the spec or env."""
    owner_ids = _owner_ids(spec.user)
    labels = kube_labels(spec.labels)
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.tmp_bytes)}},
        {"name": "agent-work", "emptyDir": {}},
    ]
    if agent_keys:
        volumes.append({"name": "agent-cfg", "secret": {"secretName": name, "defaultMode": 0o440,
                                                        "items": [{"key": k, "path": k} for k in agent_keys]}})
    main_mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    fetch_mounts: list[dict[str, Any]] = [{"name": "agent-cfg", "mountPath": f"{AGENT_ROOT}/cfg", "readOnly": True}]
    upload_mounts: list[dict[str, Any]] = [{"name": "agent-cfg", "mountPath": f"{AGENT_ROOT}/cfg", "readOnly": True},
                     {"name": "agent-work", "mountPath": f"{AGENT_ROOT}/work"}]
    if handoff.inputs:
        volumes.append({"name": "in", "emptyDir": {}})
        fetch_mounts.append({"name": "in", "mountPath": f"{AGENT_ROOT}/in"})
        for i, m in enumerate(handoff.inputs):
            sub = f"{i}/{m.source.name}" if i in handoff.file_inputs else str(i)
            main_mounts.append({"name": "in", "mountPath": m.target, "subPath": sub, "readOnly": True})
    for i, m in enumerate(handoff.outputs):
        volumes.append({"name": f"out-{i}", "emptyDir": {}})
        main_mounts.append({"name": f"out-{i}", "mountPath": m.target})
        upload_mounts.append({"name": f"out-{i}", "mountPath": f"{AGENT_ROOT}/out/{i}", "readOnly": True})
    if spec.secrets:
        volumes.append({"name": "secrets", "secret": {
            "secretName": name, "defaultMode": 0o440,
            "items": [{"key": f"secret-{s.name}", "path": s.name} for s in spec.secrets]}})
        main_mounts.append({"name": "secrets", "mountPath": SECRETS_TARGET, "readOnly": True})
    main: dict[str, Any] = {
        "name": MAIN, "image": image, "imagePullPolicy": pull_policy(image),
        "env": [{"name": k, "value": v} for k, v in {"HOME": "/tmp", **spec.env}.items()],
        "workingDir": spec.workdir, "volumeMounts": main_mounts,
        "securityContext": _hardened(owner_ids),
        "resources": _resources(spec.cpus, spec.memory_bytes, spec.gpus),
    }
    if spec.entrypoint is not None:
        main["command"] = list(spec.entrypoint)
    if spec.command is not None:
        main["args"] = list(spec.command)
    # the agent runs as the stage's user (so it reads and writes the same files), never as root
    agent_owner = owner_ids if owner_ids and owner_ids[0] != 0 else (NOBODY, NOBODY)
    fs_group = owner_ids[1] if owner_ids and owner_ids[0] != 0 else NOBODY  # group of the Secret files (0440)

    def agent(cname: str, script: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": cname, "image": agent_image, "imagePullPolicy": pull_policy(agent_image),
                "command": ["sh", "-c", script], "volumeMounts": mounts,
                "env": [{"name": "HOME", "value": f"{AGENT_ROOT}/work"}],
                "securityContext": _hardened(agent_owner), "resources": _resources(0.1, AGENT_MEMORY)}

    containers = [main]
    if handoff.outputs:
        containers.append(agent(UPLOAD, upload_script(handoff), upload_mounts))
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never", "containers": containers, "volumes": volumes,
        "automountServiceAccountToken": False, "enableServiceLinks": False, "terminationGracePeriodSeconds": 10,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "fsGroup": fs_group},
    }
    if handoff.inputs:
        pod_spec["initContainers"] = [agent(FETCH, fetch_script(handoff), fetch_mounts)]
    if placement.node_selector:
        pod_spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in placement.tolerations]
    job_spec: dict[str, Any] = {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod_spec}}
    if spec.timeout_s:
        job_spec["activeDeadlineSeconds"] = max(1, math.ceil(spec.timeout_s))
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": labels, "annotations": {ANNOTATION_PIPELINE: owner}},
            "spec": job_spec}


def secret_manifest(name: str, labels: Mapping[str, str], spec: ContainerSpec,
                    agent_files: Mapping[str, bytes], owner: str = "") -> dict[str, Any]:
    """The attempt's Secret: the stage's secrets (as files at /run/secrets) and the agent's signed URLs."""
    import base64

    data = {f"secret-{s.name}": base64.b64encode(s.value.encode()).decode() for s in spec.secrets}
    data |= {k: base64.b64encode(v).decode() for k, v in agent_files.items()}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "labels": kube_labels(labels), "annotations": {ANNOTATION_PIPELINE: owner}},
            "data": data}


def form_parts(fields: Mapping[str, str], boundary: str) -> tuple[bytes, bytes, str]:
    """A presigned POST's multipart body around the file: (head, tail, content type)."""
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="out.tar"\r\n'
             "Content-Type: application/x-tar\r\n\r\n").encode()
    return head, f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class PodView:
    """What the executor needs from a pod's status (the API's JSON), read by `pod_view`."""

    phase: str
    main_started: bool  # running or terminated: its log can be read
    main_exit: int | None
    main_reason: str  # e.g. OOMKilled, Error, Completed
    waiting: str  # "Reason: message" of a container that waits (ErrImageNeverPull, ...), "" if none
    upload_exit: int | None
    fetch_exit: int | None


def _state_of(statuses: Sequence[Mapping[str, Any]], cname: str) -> Mapping[str, Any]:
    for s in statuses:
        if s.get("name") == cname:
            return s.get("state") or {}
    return {}


def pod_view(pod: Mapping[str, Any]) -> PodView:
    status = pod.get("status") or {}
    inits, mains = status.get("initContainerStatuses") or [], status.get("containerStatuses") or []
    main, fetch, upload = _state_of(mains, MAIN), _state_of(inits, FETCH), _state_of(mains, UPLOAD)
    waiting = ""
    for state in (fetch, main, upload):
        w = state.get("waiting") or {}
        if w.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            waiting = f"{w['reason']}: {w.get('message') or ''}".strip().rstrip(":")
            break
    term = main.get("terminated") or {}
    return PodView(
        phase=str(status.get("phase") or "Pending"),
        main_started=bool(main.get("running") or term),
        main_exit=term.get("exitCode") if term else None,
        main_reason=str(term.get("reason") or ""),
        waiting=waiting,
        upload_exit=(upload.get("terminated") or {}).get("exitCode"),
        fetch_exit=(fetch.get("terminated") or {}).get("exitCode"),
    )


def job_failure(job: Mapping[str, Any]) -> str | None:
    """The reason of a Job's Failed condition (DeadlineExceeded, BackoffLimitExceeded), or None."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return str(c.get("reason") or "Failed")
    return None


def event_reason(events: Sequence[Mapping[str, Any]]) -> str:
    """The latest Warning event's "Reason: message" (FailedCreatePodSandBox, FailedScheduling, ...), or ""."""
    warnings = [e for e in events if e.get("type") == "Warning"]
    if not warnings:
        return ""
    e = max(warnings, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return f"{e.get('reason')}: {' '.join(str(e.get('message') or '').split())}"[:300]
