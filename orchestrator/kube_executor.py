"""Runs one ContainerSpec as a batch/v1 Job on a Kubernetes cluster: the one module that imports `kubernetes`.

Host paths in, host paths out (the Executor protocol): inputs are sent to the object store as one tar per mount
and fetched by the pod's init container; outputs come back through the pod's upload container and are unpacked
into the host paths the runner gave. kube_spec.py holds the translation; this module talks to the API server.
Only stable APIs: batch/v1 Job, core/v1 Pod, Secret, Event and pod logs.
"""

from __future__ import annotations

import base64
import secrets
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from orchestrator import kube_spec
from orchestrator.docker_executor import classify, filled_disk
from orchestrator.errors import EngineError, RemoteError, UsageError
from orchestrator.executor import (
    LABEL_HOST,
    LABEL_PID,
    LABEL_RUN,
    ContainerSpec,
    ExecResult,
    Outcome,
    OutputSink,
    RanOn,
    starter_alive,
)
from orchestrator.hostfiles import LINE_CAP_BYTES, TAIL_LINES, CappedLog, StageLogSink, redactions
from orchestrator.kube_spec import FETCH, MAIN, UPLOAD, Handoff, Placement, PodView
from orchestrator.objectstore import ObjectStore
from orchestrator.units import format_duration

POLL_S = 0.25
ANNOTATION_RUN, ANNOTATION_PID, ANNOTATION_HOST = "dev.pipe/run", "dev.pipe/pid", "dev.pipe/host"
API_FAULTS = (ApiException, OSError, urllib3.exceptions.HTTPError)
FOREGROUND = "Foreground"
# without `list` on nodes: one stage at a time by default (--jobs and each stage's cpus still apply), never more
# than one cpu's worth of caps at once, so pods do not wait for a cluster pipe cannot see (docs/kubernetes.md)
UNKNOWN_CAPACITY = (1.0, 1 << 62)


@dataclass(frozen=True)
class KubeSettings:
    """The `executor:` block of pipeline.yaml, resolved (see spec.KubernetesExecutor)."""

    namespace: str
    handoff_url: str  # s3://bucket/prefix/ for inputs and outputs on their way to and from pods
    handoff_endpoint: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    agent_image: str = "pipe-busybox:latest"
    pending_timeout_s: float = 300.0
    placements: Mapping[str, Placement] = field(default_factory=dict)  # stage -> node selector, tolerations


def connect(context: str | None = None, kubeconfig: str | None = None) -> k8s.ApiClient:
    """An API client from the standard kubeconfig chain (KUBECONFIG, ~/.kube/config) that answered /version.
    A context the kubeconfig does not have is bad input (UsageError); one that does not answer an EngineError."""
    if context is not None:
        try:
            contexts, _ = k8s_config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException as e:
            raise EngineError(f"kubeconfig unreadable: {_short(e)}") from e
        names = sorted(str(c.get("name")) for c in contexts or ())
        if context not in names:
            raise UsageError(f"kubernetes context {context!r} is not in the kubeconfig (it has: "
                             f"{', '.join(names) or 'none'})")
    try:
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=configuration)
        api = k8s.ApiClient(configuration)
        k8s.VersionApi(api).get_code(_request_timeout=10)
    except (k8s_config.ConfigException, *API_FAULTS) as e:
        raise EngineError(f"kubernetes API unreachable{f' (context {context})' if context else ''}: "
                          f"{_short(e)}") from e
    return api


def _fault(error: BaseException) -> EngineError:
    """One line for an API call that failed: what RBAC forbids (a 403 names the verb and resource), or why the
    API server did not answer."""
    if isinstance(error, ApiException) and error.status == 403:
        return EngineError(f"RBAC forbids it: {_api_message(error)}")
    return EngineError(f"kubernetes API unreachable: {_short(error)}")


def _short(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"{error.status} {_api_message(error)}"  # a 403 names the verb and resource RBAC forbids
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class KubernetesExecutor:
    """Runs ContainerSpecs as Jobs in one namespace; thread-safe (parallel.py runs several at once).

    run: inputs up -> Secret, Job -> wait for the pod (pending deadline) -> stream main's log -> classify ->
    go-object -> outputs down -> delete Job (propagation: its pods too), Secret and the attempt's objects.
    """

    def __init__(self, api: k8s.ApiClient, settings: KubeSettings, store: ObjectStore,
                 image_refs: Mapping[str, str] | None = None) -> None:
        self._api, self._settings, self._store = api, settings, store
        self._core: Any = k8s.CoreV1Api(api)  # Any: dict bodies, which the client sends as they are
        self._batch: Any = k8s.BatchV1Api(api)
        self._refs = dict(image_refs or {})
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._cancelled: set[str] = set()
        self._never_started: set[str] = set()  # attempts whose main container never ran
        self._stop_requests = 0

    @property
    def namespace(self) -> str:
        return self._settings.namespace

    def run(self, spec: ContainerSpec, on_output: OutputSink) -> ExecResult:
        started_at = _now()
        if self._stop_requests:
            return _result(Outcome.CANCELLED, None, "cancelled", started_at)
        name = kube_spec.dns_name("pipe", spec.name, secrets.token_hex(4))
        handoff = Handoff.of(spec, [m.source.is_file() for m in spec.mounts])
        try:
            files = self._send_inputs(name, spec, handoff)
            secret = kube_spec.secret_manifest(name, spec.labels, spec, files, owner=_owner(spec))
            job = kube_spec.job_manifest(
                spec, name=name, image=self._refs.get(spec.image_id, spec.image_id),
                agent_image=self._refs.get(self._settings.agent_image, self._settings.agent_image),
                handoff=handoff, placement=self._settings.placements.get(spec.name, Placement()),
                owner=_owner(spec), agent_keys=sorted(files))
            for manifest in (secret, job):
                manifest["metadata"]["annotations"].update(_annotations(spec))
            with self._lock:
                if self._stop_requests:
                    return _result(Outcome.CANCELLED, None, "cancelled", started_at)
                self._running.add(name)
            try:
                self._core.create_namespaced_secret(self.namespace, secret)
                self._batch.create_namespaced_job(self.namespace, job)
                result = self._supervise(name, spec, handoff, on_output)
                return replace(result, ran_on=RanOn("kubernetes", self._node_of(name), name),
                               warnings=(kube_spec.sandbox_warning(spec),))
            finally:
                with self._lock:
                    self._running.discard(name)
                    self._cancelled.discard(name)
                    never_started = name in self._never_started
                    self._never_started.discard(name)
                # a pod that never started (ErrImageNeverPull, ...) has nothing to stop gracefully, and the
                # kubelet takes ~40 s to get to it (its sync backoff): removed at once
                self._delete(name, 0 if never_started else None)
        except RemoteError as e:
            return _result(Outcome.ERROR, None, f"object store hand-off failed: {e}", started_at)
        except ApiException as e:
            refused = "RBAC forbids it" if e.status == 403 else "kubernetes refused the job"
            return _result(Outcome.ERROR, None, f"{refused}: {_api_message(e)}", started_at)
        except API_FAULTS as e:
            raise _fault(e) from e
        finally:
            with suppress(RemoteError):
                self._store.delete(o.key for o in self._store.list(f"k8s/{name}/"))

    def stop_all(self) -> None:
        """Delete every running Job of this executor (its pods get their grace period; a second call deletes
        them at once); their run() calls return CANCELLED. Without waiting; idempotent."""
        with self._lock:
            self._stop_requests += 1
            grace = 0 if self._stop_requests > 1 else None
            names = sorted(self._running)
            self._cancelled.update(names)
        for name in names:
            threading.Thread(target=self._delete, args=(name, grace), daemon=True).start()

    # -- one attempt ---------------------------------------------------------------------------------------

    def _send_inputs(self, name: str, spec: ContainerSpec, handoff: Handoff) -> dict[str, bytes]:
        """Each input as one tar in the store, and the agent's files: signed URLs (and POST forms) for them."""
        expires = int(min(7 * 86400, (spec.timeout_s or 86400) + self._settings.pending_timeout_s + 3600))
        files: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="pipe-k8s-") as tmp:
            for i, mount in enumerate(handoff.inputs):
                key, archive = f"k8s/{name}/in-{i}.tar", Path(tmp) / f"in-{i}.tar"
                with tarfile.open(archive, "w") as tar:
                    tar.add(mount.source, arcname=mount.source.name if mount.source.is_file() else ".")
                self._store.put_file(key, archive)
                files[f"in-{i}.url"] = self._store.presign_get(key, expires).encode()
        if handoff.outputs:
            files["go.url"] = self._store.presign_get(f"k8s/{name}/go", expires).encode()
            for i in range(len(handoff.outputs)):
                url, fields = self._store.presign_post(f"k8s/{name}/out-{i}.tar", expires)
                head, tail, ctype = kube_spec.form_parts(fields, f"pipe-{secrets.token_hex(12)}")
                files |= {f"out-{i}.url": url.encode(), f"out-{i}.head": head, f"out-{i}.tail": tail,
                          f"out-{i}.type": ctype.encode()}
        return files

    def _supervise(self, name: str, spec: ContainerSpec, handoff: Handoff, on_output: OutputSink) -> ExecResult:
        started_at = _now()
        pending_until = time.monotonic() + self._settings.pending_timeout_s
        view, failure, pod_name = None, None, ""
        with self._lock:
            self._never_started.add(name)
        while True:  # until main has started (or the attempt cannot start)
            if self._is_cancelled(name):
                return _result(Outcome.CANCELLED, None, "cancelled", started_at)
            failure, pod_name, view = self._look(name)
            if failure == "DeadlineExceeded":
                return _timeout(spec, started_at)
            if view is not None and view.fetch_exit not in (None, 0):
                return _result(Outcome.ERROR, None, f"fetching inputs failed: {self._tail(pod_name, FETCH)}",
                               started_at)
            if view is not None and view.main_started:
                with self._lock:
                    self._never_started.discard(name)
                break
            if failure is not None:
                return _result(Outcome.ERROR, None, f"job failed before the stage started: {failure}", started_at)
            if time.monotonic() > pending_until:
                why = (view.waiting if view else "") or self._event_reason(pod_name) or "no pod was scheduled"
                return _result(Outcome.ERROR, None, f"pending for {format_duration(self._settings.pending_timeout_s)}"
                               f": {why}", started_at)
            time.sleep(POLL_S)
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._stream(pod_name, spec, on_output, tail)
        while view is None or view.main_exit is None:  # the log ends a moment before the status says so
            if self._is_cancelled(name):
                return _result(Outcome.CANCELLED, None, "cancelled", started_at)
            failure, pod_name, view = self._look(name)
            if failure == "DeadlineExceeded":
                return _timeout(spec, started_at)
            if view is not None and view.main_exit is not None:
                break  # a failed main fails the Job too (BackoffLimitExceeded): its exit code says more
            if failure is not None or not pod_name:
                return _result(Outcome.ERROR, None, f"pod vanished ({failure or 'deleted outside pipe'})", started_at)
            time.sleep(POLL_S)
        exit_code = int(view.main_exit)
        outcome, reason = classify(exit_code, {"OOMKilled": view.main_reason == "OOMKilled"},
                                   memory_bytes=spec.memory_bytes, timed_out=failure == "DeadlineExceeded",
                                   cancelled=self._is_cancelled(name), timeout_s=spec.timeout_s, tail=tail)
        if outcome is Outcome.SUCCEEDED and handoff.outputs:
            problem = self._receive_outputs(name, handoff)
            if problem == "cancelled":
                return _result(Outcome.CANCELLED, exit_code, "cancelled", started_at)
            if problem == "DeadlineExceeded":
                return _timeout(spec, started_at)
            if problem:
                return _result(Outcome.ERROR, exit_code, problem, started_at)
        return _result(outcome, exit_code, reason, started_at,
                       disk_full=outcome is Outcome.FAILED and filled_disk(tail))

    def _receive_outputs(self, name: str, handoff: Handoff) -> str:
        """Tell the upload container to go, wait for it, unpack each output into its host path; "" when done."""
        self._store.put_bytes(f"k8s/{name}/go", b"go")
        while True:
            if self._is_cancelled(name):
                return "cancelled"
            failure, pod_name, view = self._look(name)
            if view is not None and view.upload_exit is not None:
                break
            if failure is not None:
                return failure
            time.sleep(POLL_S)
        if view.upload_exit != 0:
            return f"uploading outputs failed (exit {view.upload_exit}): {self._tail(pod_name, UPLOAD)}"
        with tempfile.TemporaryDirectory(prefix="pipe-k8s-") as tmp:
            for i, mount in enumerate(handoff.outputs):
                encoded, archive = Path(tmp) / f"out-{i}.b64", Path(tmp) / f"out-{i}.tar"
                self._store.fetch_file(f"k8s/{name}/out-{i}.tar", encoded)
                with open(encoded, "rb") as src, open(archive, "wb") as dst:
                    base64.decode(src, dst)  # see kube_spec.upload_script
                mount.source.mkdir(parents=True, exist_ok=True)
                with tarfile.open(archive) as tar:
                    tar.extractall(mount.source, filter="data")  # no absolute paths, links out or devices
        return ""

    def _node_of(self, job: str) -> str | None:
        """The node the Job's pod was bound to (None if it never was, or the API cannot say)."""
        with suppress(*API_FAULTS):
            for pod in self._core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job}").items:
                return str(pod.spec.node_name) if pod.spec and pod.spec.node_name else None
        return None

    def _look(self, name: str) -> tuple[str | None, str, PodView | None]:
        """The Job's failure reason (or None), its pod's name ("" if none yet) and the pod's status."""
        try:
            job = self._batch.read_namespaced_job_status(name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return "Job deleted outside pipe", "", None
            raise
        failure = kube_spec.job_failure(_plain(self._api, job))
        pods = self._core.list_namespaced_pod(self.namespace, label_selector=f"job-name={name}").items
        if not pods:
            return failure, "", None
        pod = _plain(self._api, pods[0])
        return failure, str(pod["metadata"]["name"]), kube_spec.pod_view(pod)

    def _stream(self, pod_name: str, spec: ContainerSpec, on_output: OutputSink, tail: deque[str]) -> None:
        """Pass main's output on line by line (`logs -f` through the API) until it ends; secrets redacted."""
        with CappedLog(spec.log_path) as log:
            sink = StageLogSink(log, redactions(spec.secrets), on_output, tail)
            try:
                response = self._core.read_namespaced_pod_log(pod_name, self.namespace, container=MAIN,
                                                              follow=True, _preload_content=False)
                for chunk in _chunks(response):
                    sink.feed(chunk)
                    sink.flush()
            except API_FAULTS:
                pass  # the pod went away (cancel, deadline): the status says what happened
            sink.close()

    def _tail(self, pod_name: str, container: str) -> str:
        with suppress(*API_FAULTS):
            text = self._core.read_namespaced_pod_log(pod_name, self.namespace, container=container, tail_lines=3)
            return " | ".join(line for line in str(text).splitlines() if line.strip())[:300] or "no output"
        return "no output"

    def _event_reason(self, pod_name: str) -> str:
        if not pod_name:
            return ""
        events = self._core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={pod_name}")
        return kube_spec.event_reason([_plain(self._api, e) for e in events.items])

    def _is_cancelled(self, name: str) -> bool:
        with self._lock:
            return name in self._cancelled

    def _delete(self, name: str, grace: int | None = None) -> None:
        delete_objects(self._batch, self._core, self.namespace, name, grace)


def delete_objects(batch: k8s.BatchV1Api, core: k8s.CoreV1Api, namespace: str, name: str,
                   grace: int | None = None) -> None:
    """Delete an attempt's Job with its pods (Foreground propagation) and its Secret; gone already is fine.
    grace 0: the pods are deleted at once too (propagation gives them their own grace period)."""
    body = k8s.V1DeleteOptions(propagation_policy=FOREGROUND, grace_period_seconds=grace)
    deletes: list[tuple[Callable[..., Any], str]] = [(batch.delete_namespaced_job, name)]
    if grace == 0:
        with suppress(ApiException):
            pods: list[Any] = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
            deletes += [(core.delete_namespaced_pod, str(p.metadata.name)) for p in pods]
    deletes.append((core.delete_namespaced_secret, name))
    for delete, target in deletes:
        try:
            delete(target, namespace, body=body)
        except ApiException as e:
            if e.status != 404:
                raise


def sweep_jobs(api: k8s.ApiClient, namespace: str, owner: str, is_alive: Callable[[str], bool | None],
               store: ObjectStore | None = None) -> list[str]:
    """The reaper: delete the Jobs and Secrets of pipeline `owner` whose run is not alive (found by label), and
    each such attempt's hand-off objects (`k8s/<job>/` in `store`); return those runs' ids, sorted. `is_alive` as
    for docker_executor.sweep_orphans."""
    batch: Any = k8s.BatchV1Api(api)
    core: Any = k8s.CoreV1Api(api)
    selector = kube_spec.owner_selector(owner)
    dead: set[str] = set()
    alive: dict[str, bool] = {}
    try:
        found: list[Any] = [*batch.list_namespaced_job(namespace, label_selector=selector).items,
                 *core.list_namespaced_secret(namespace, label_selector=selector).items]
        for obj in found:
            notes = obj.metadata.annotations or {}
            if notes.get(kube_spec.ANNOTATION_PIPELINE) != owner:
                continue  # another state dir whose path hashes alike: not ours
            run_id = str(notes.get(ANNOTATION_RUN) or (obj.metadata.labels or {}).get(LABEL_RUN, ""))
            if run_id not in alive:
                known = is_alive(run_id)
                alive[run_id] = starter_alive(notes.get(ANNOTATION_HOST), notes.get(ANNOTATION_PID)) if known is None else known
            if not alive[run_id]:
                delete_objects(batch, core, namespace, obj.metadata.name)
                if store is not None:
                    store.delete(o.key for o in store.list(f"k8s/{obj.metadata.name}/"))
                dead.add(run_id)
    except API_FAULTS as e:
        raise _fault(e) from e
    return sorted(dead)


def capacity(api: k8s.ApiClient) -> tuple[float, int]:
    """(cpus, memory bytes) allocatable over the cluster's nodes: what --jobs and the caps' budget are bounded by."""
    from kubernetes.utils import parse_quantity  # an untyped module: its Decimal results are cast below

    quantity: Callable[[str], Any] = parse_quantity
    try:
        nodes: list[Any] = k8s.CoreV1Api(api).list_node().items
    except ApiException as e:
        if e.status == 403:  # a namespace-only Role (docs/kubernetes.md): the cluster's size is unknown
            return UNKNOWN_CAPACITY
        raise _fault(e) from e
    except API_FAULTS as e:
        raise _fault(e) from e
    allocatable = [n.status.allocatable or {} for n in nodes]
    cpus: float = sum((float(quantity(a.get("cpu", "0"))) for a in allocatable), 0.0)
    memory: int = sum((int(quantity(a.get("memory", "0"))) for a in allocatable), 0)
    return max(cpus, 1.0), memory


def gpu_problem(api: k8s.ApiClient) -> str | None:
    """Why no stage can get GPUs on this cluster (no node offers nvidia.com/gpu), or None."""
    try:
        nodes: list[Any] = k8s.CoreV1Api(api).list_node().items
    except API_FAULTS as e:
        raise _fault(e) from e
    if any(int((n.status.allocatable or {}).get("nvidia.com/gpu", "0")) > 0 for n in nodes):
        return None
    return "no node of the cluster offers nvidia.com/gpu (install NVIDIA's device plugin), or set gpus: 0"


def _plain(api: k8s.ApiClient, obj: Any) -> Any:
    """An API object as the API's own JSON (camelCase dicts), for kube_spec's pure readers."""
    return api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]


def _chunks(response: Any) -> Iterator[bytes]:
    try:
        yield from response.stream(LINE_CAP_BYTES, decode_content=True)
    finally:
        response.release_conn()


def _api_message(e: ApiException) -> str:
    import json

    with suppress(ValueError, TypeError):
        return str(json.loads(e.body or "").get("message") or e.reason)[:300]
    return f"{e.status} {e.reason}"


def _owner(spec: ContainerSpec) -> str:
    from orchestrator.executor import LABEL_PIPELINE

    return str(spec.labels.get(LABEL_PIPELINE, ""))


def _annotations(spec: ContainerSpec) -> dict[str, str]:
    keys = {LABEL_RUN: ANNOTATION_RUN, LABEL_PID: ANNOTATION_PID, LABEL_HOST: ANNOTATION_HOST}
    return {note: str(spec.labels[label]) for label, note in keys.items() if label in spec.labels}


def _timeout(spec: ContainerSpec, started_at: datetime) -> ExecResult:
    reason = f"timed out after {format_duration(spec.timeout_s)}" if spec.timeout_s else "timed out"
    return _result(Outcome.TIMEOUT, None, f"{reason} (activeDeadlineSeconds)", started_at)


def _now() -> datetime:
    return datetime.now(UTC)


def _result(outcome: Outcome, exit_code: int | None, reason: str, started_at: datetime,
            disk_full: bool = False) -> ExecResult:
    return ExecResult(outcome=outcome, exit_code=exit_code, reason=reason, started_at=started_at,
                      finished_at=_now(), disk_full=disk_full)


__all__: Sequence[str] = ("KubeSettings", "KubernetesExecutor", "connect", "gpu_problem", "sweep_jobs")
