"""Runs one ContainerSpec as Docker Swarm service tasks: hand-off in, the stage, hand-off out; states, not exit codes.

One attempt (host paths in, host paths out, as the Executor protocol says):
  1. the spec's read-only mount sources go to the object store: by content digest from this host
     (handoff.stage_source), or, for content in the store's blobs already (Mount.stored), as a list (stage_tree);
  2. a fetch task (the agent image) lands where the stage may run (its constraints and reservations), places them
     into a folder of the node's hand-off dir, and makes an empty writable folder for the outputs;
  3. the stage task runs pinned to that node (node.id), the folders bound at the same targets, read-only or not;
  4. a push task on that node hashes the outputs, sends them to blobs/ with their listing, and removes the task's
     folder, on every path;
  5. pipe reads the listing (ExecResult.stored_outputs) and, unless the spec says fetch_outputs=False, downloads
     the outputs into the host path the runner gave.
Every task is a replicated service with restart condition none; pipe keeps the deadline, the cancel and a watch
on the node; every service, secret and network is removed at the end. See README "Running on a Docker Swarm".
"""

from __future__ import annotations

import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import docker
import docker.errors
from docker.types import (
    ContainerSpec as SwarmContainerSpec,
)
from docker.types import (
    Mount as DockerMount,
)
from docker.types import (
    Placement,
    Resources,
    RestartPolicy,
    SecretReference,
    ServiceMode,
    TaskTemplate,
)

from orchestrator import handoff
from orchestrator.docker_executor import ENGINE_FAULTS, filled_disk, short_reason
from orchestrator.errors import EngineError, RemoteError
from orchestrator.executor import (
    DISK_FULL,
    LABEL_MANAGED,
    LABEL_RUN,
    LABEL_STAGE,
    ContainerSpec,
    ExecResult,
    Mount,
    Outcome,
    OutputSink,
    RanOn,
)
from orchestrator.hostfiles import TAIL_LINES, CappedLog, StageLogSink, redactions
from orchestrator.objectstore import ObjectStore, bounded_map
from orchestrator.remote import restore_tree
from orchestrator.units import format_bytes, format_duration

TERMINAL = {"complete", "failed", "rejected", "shutdown", "orphaned", "remove"}
POLL_S = 0.2
NODE_CHECK_S = 1.0
STOP_GRACE_NS = 10 * 10**9
REMOVAL_WAIT_S = 30.0
LABEL_TASK = "dev.pipe.task"  # the attempt's token, shared by its services, secrets and network
LABEL_ROLE = "dev.pipe.role"  # agent | stage | clean (the cleanup waiting for a lost node)
NODE_LOST = "node"  # how _wait's reason for a lost node begins ("node pipe-n3 lost (down) ...")
SECRETS_TARGET = "/run/secrets"
AGENT_MEMORY = 256 << 20
# Swarm on Engine 20.10 (API 1.41) has no field for these: said once per stage before a run (sandbox_gaps)
UNENFORCED = ("no-new-privileges", "no swap (memory+swap is twice the memory cap; the nodes' swap decides)",
              "a private IPC namespace (the node daemon's default)")


@dataclass(frozen=True)
class SwarmSettings:
    agent_image: str  # registry/pipe/agent@sha256:...
    bucket_prefix: str  # "bucket/prefix/" as rclone names it
    rclone_config: str  # handed to the agent tasks as a swarm secret
    handoff_dir: str = "/var/lib/pipe-handoff"
    constraints: tuple[str, ...] = ()
    pending_timeout_s: float = 120.0
    stage_constraints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # a stage's own list


def sandbox_gaps(spec_user: str | None = None) -> tuple[str, ...]:
    """What the sandbox promises that a swarm task on Engine 20.10 does not get (a validation warning)."""
    return UNENFORCED


def classify_task(task: Mapping[str, Any], *, memory_bytes: int | None, timed_out: bool, cancelled: bool,
                  timeout_s: float | None = None, tail: Sequence[str] = ()) -> tuple[Outcome, int | None, str]:
    """The outcome, exit code and reason of a finished stage task. The state decides, not the exit code: a task
    that was rejected or never started reports ExitCode 0. OOMKilled is only on the node's daemon, so a 137 under
    a memory cap is called a probable OOM."""
    status = task.get("Status") or {}
    state = str(status.get("State", ""))
    exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
    if timed_out:
        return Outcome.TIMEOUT, exit_code, f"timed out after {format_duration(timeout_s)}" if timeout_s else "timed out"
    if cancelled:
        return Outcome.CANCELLED, exit_code, "cancelled"
    if state == "complete" and exit_code == 0:
        return Outcome.SUCCEEDED, 0, ""
    if state == "failed" and isinstance(exit_code, int) and exit_code != 0:
        if exit_code == 137 and memory_bytes is not None:
            return Outcome.OOM, 137, f"killed (137), probably out of memory (cap {format_bytes(memory_bytes)})"
        reason = f"exited with code {exit_code}"
        if filled_disk(tail):
            reason += f": {DISK_FULL}"
        return Outcome.FAILED, exit_code, reason
    why = status.get("Err") or status.get("Message") or "no reason given"
    return Outcome.ERROR, None, f"swarm task {state or 'lost'} before the stage ran: {why}"


def task_token(spec: ContainerSpec) -> str:
    run = spec.labels.get(LABEL_RUN, "run")
    stage = re.sub(r"[^a-z0-9-]", "-", spec.name.lower())[:20]
    return f"pipe-{re.sub(r'[^a-z0-9-]', '-', run.lower())[:24]}-{stage}-{secrets.token_hex(3)}"


def stage_template(spec: ContainerSpec, image: str, node_id: str, binds: Sequence[tuple[str, str, bool]],
                   secret_refs: Sequence[SecretReference], network: str | None,
                   constraints: Sequence[str] = ()) -> TaskTemplate:
    """The stage's task: caps (limits = reservations, so the scheduler counts them), the sandbox fields Swarm
    has, the hand-off folders bound at the runner's targets, pinned to the fetch task's node. Pure."""
    mounts = [DockerMount(target, source, type="bind", read_only=ro) for source, target, ro in binds]
    mounts.append(DockerMount("/tmp", None, type="tmpfs", tmpfs_size=spec.tmp_bytes, tmpfs_mode=0o1777))
    container = SwarmContainerSpec(
        image, command=list(spec.command) if spec.command is not None else None,
        env={"HOME": "/tmp", **spec.env}, workdir=spec.workdir, user=spec.user,
        labels={LABEL_MANAGED: "1", **spec.labels}, mounts=mounts, secrets=list(secret_refs) or None,
        read_only=True, init=True, cap_drop=["ALL"], stop_grace_period=STOP_GRACE_NS,
    )
    if spec.entrypoint is not None:  # the SDK calls the entrypoint "command" and the command "args"
        container["Command"] = list(spec.entrypoint)
        container["Args"] = list(spec.command or ())
    elif spec.command is not None:
        container.pop("Command", None)
        container["Args"] = list(spec.command)
    return TaskTemplate(container, resources=caps(spec), restart_policy=RestartPolicy(condition="none"),
                        placement=Placement(constraints=[*constraints, f"node.id=={node_id}"]),
                        networks=[network] if network else None)


def caps(spec: ContainerSpec) -> Resources:
    cpu = int(spec.cpus * 1e9) if spec.cpus is not None else None
    generic: Any = {"gpu": spec.gpus} if spec.gpus else None
    res = Resources(cpu_limit=cpu, mem_limit=spec.memory_bytes, cpu_reservation=cpu,
                    mem_reservation=spec.memory_bytes, generic_resources=generic)
    if spec.pids is not None:
        res.setdefault("Limits", {})["Pids"] = spec.pids
    return res


class SwarmExecutor:
    """Runs ContainerSpecs on a swarm through its manager; thread-safe. image_refs maps the image ids the runner
    knows (and keys the cache with) to the registry/repo@sha256 references the nodes pull."""

    def __init__(self, client: docker.DockerClient, store: ObjectStore, settings: SwarmSettings,
                 image_refs: Mapping[str, str]) -> None:
        self._client, self._store, self._settings, self._refs = client, store, settings, image_refs
        self._api: Any = client.api  # the SDK's low-level calls are untyped
        self._lock = threading.Lock()
        self._stage_services: dict[str, str] = {}  # token -> the running stage service's id
        self._cancelled: set[str] = set()
        self._stop_requests = 0

    def run(self, spec: ContainerSpec, on_output: OutputSink) -> ExecResult:
        started_at = _now()
        if self._stop_requests:
            return _result(Outcome.CANCELLED, None, "cancelled", started_at)
        token = task_token(spec)
        run_id = spec.labels.get(LABEL_RUN, "run")
        task_dir = f"{re.sub(r'[^A-Za-z0-9_.-]', '-', run_id)}/{token}"
        labels = {LABEL_MANAGED: "1", **spec.labels, LABEL_TASK: token}
        made: list[Callable[[], None]] = []  # undo steps, run in reverse on every path
        try:
            return self._attempt(spec, on_output, token, task_dir, labels, made, started_at)
        except RemoteError as e:
            return _result(Outcome.ERROR, None, f"hand-off failed: {e}", started_at)
        except ENGINE_FAULTS as e:
            if isinstance(e, docker.errors.APIError):
                return _result(Outcome.ERROR, None, f"swarm manager refused: {short_reason(e)}", started_at)
            raise EngineError(f"swarm manager unreachable: {short_reason(e)}") from e
        finally:
            for undo in reversed(made):
                with suppress(*ENGINE_FAULTS):
                    undo()
            with self._lock:
                self._stage_services.pop(token, None)
                self._cancelled.discard(token)

    def stop_all(self) -> None:
        """Remove every running stage service (its task gets SIGTERM, SIGKILL after the grace); later runs
        return CANCELLED. A second call does the same again (Swarm has no separate kill)."""
        with self._lock:
            self._stop_requests += 1
            running = dict(self._stage_services)
            self._cancelled.update(running)
        for service_id in running.values():
            threading.Thread(target=self._remove_service, args=(service_id,), daemon=True).start()

    # -- one attempt ---------------------------------------------------------------------------------------

    def _attempt(self, spec: ContainerSpec, on_output: OutputSink, token: str, task_dir: str,
                 labels: dict[str, str], made: list[Callable[[], None]], started_at: datetime) -> ExecResult:
        image = self._refs.get(spec.image_id, spec.image_id)
        indexed = list(enumerate(spec.mounts))
        staged = bounded_map(lambda im: (im[0], self._staged(im[1])), [im for im in indexed if im[1].read_only], 4)
        outputs = [i for i, m in indexed if not m.read_only]
        agent_secret = self._secret(f"{token}-s3", self._settings.rclone_config, labels, made)
        agent_ref = SecretReference(agent_secret, f"{token}-s3", filename="rclone.conf", mode=0o400)
        owner = spec.user or "0:0"
        fetch = handoff.fetch_script(task_dir, staged, outputs, owner, self._settings.bucket_prefix)
        stage = spec.labels.get(LABEL_STAGE, spec.name)
        constraints = [*self._settings.constraints, *self._settings.stage_constraints.get(stage, ())]
        task, fetch_logs = self._agent(f"{token}-fetch", fetch, labels, agent_ref, constraints,
                                       reserve=spec, pending_s=self._settings.pending_timeout_s)
        node_id = str(task.get("NodeID") or "")
        fetch_err = str((task.get("Status") or {}).get("Err") or "")
        if fetch_err.startswith(f"{NODE_LOST} "):  # lost while fetching: the stage never started there
            self._clean_later(node_id, task_dir, labels, agent_ref)
            return replace(_result(Outcome.ERROR, None, f"hand-off to the node failed: {fetch_err}", started_at),
                           node_lost=True)
        if (task.get("Status") or {}).get("State") == "pending":  # no node fits the stage: say why, plainly
            return _result(Outcome.ERROR, None, str((task.get("Status") or {}).get("Err")), started_at)
        if (task.get("Status") or {}).get("State") != "complete" or not node_id:
            why = classify_task(task, memory_bytes=None, timed_out=False, cancelled=False)[2]
            if node_id:
                self._agent(f"{token}-clean", handoff.push_script(task_dir, None, "", ""), labels, agent_ref,
                            [f"node.id=={node_id}"])
            tail = " | ".join(fetch_logs[-3:])
            return _result(Outcome.ERROR, None, f"hand-off to the node failed: {why}{': ' + tail if tail else ''}",
                           started_at)
        binds = []
        for i, m in indexed:
            folder = f"{self._settings.handoff_dir}/{task_dir}/m{i}"
            is_file = any(j == i and isinstance(s, handoff.Staged) and s.is_file for j, s in staged)
            binds.append((f"{folder}/{handoff.FILE_NAME}" if is_file else folder, m.target, m.read_only))
        refs = [SecretReference(self._secret(f"{token}-{s.name}", s.value, labels, made), f"{token}-{s.name}",
                                filename=s.name, uid=(owner.split(":") + ["0"])[0],
                                gid=(owner.split(":") + ["0"])[1], mode=0o400) for s in spec.secrets]
        network = None if spec.network else self._network(token, labels, made)
        result = self._stage(spec, image, token, node_id, binds, refs, network, labels, on_output)
        cancelled = result.outcome is Outcome.CANCELLED
        if result.node_lost:  # no push task can run there; its folder is removed when the node is back
            self._clean_later(node_id, task_dir, labels, agent_ref)
            return result
        push_outputs = bool(outputs) and not cancelled
        listing = f"handoff/out/{token}.listing"
        push = handoff.push_script(task_dir, outputs[0] if push_outputs else None, listing,
                                   self._settings.bucket_prefix)
        push_task, push_logs = self._agent(f"{token}-push", push, labels, agent_ref, [f"node.id=={node_id}"])
        if not push_outputs:
            return result
        marked = {mark: line.removeprefix(mark) for line in push_logs
                  for mark in (handoff.LISTING_MARK, handoff.ERROR_MARK) if line.startswith(mark)}
        succeeded = result.outcome is Outcome.SUCCEEDED
        if handoff.ERROR_MARK in marked:  # the stage left what no cache can hold: its fault, as on one host
            why = f"outputs not stored: {marked[handoff.ERROR_MARK]}"
            return replace(result, outcome=Outcome.FAILED, reason=why) if succeeded else result
        if (push_task.get("Status") or {}).get("State") != "complete" or handoff.LISTING_MARK not in marked:
            return _result(Outcome.ERROR, result.exit_code,
                           f"hand-off from the node failed: {' | '.join(push_logs[-3:]) or 'no output'}", started_at)
        tree = handoff.read_listing(self._store, listing, marked[handoff.LISTING_MARK])
        with suppress(RemoteError):
            self._store.delete([listing])  # read once; the tree is the manifest's content from here on
        if spec.fetch_outputs or not succeeded:  # a failed stage's come for debugging, as on one host
            restore_tree(self._store, tree, next(m.source for m in spec.mounts if not m.read_only))
        return replace(result, stored_outputs=tree) if succeeded else result

    def _staged(self, mount: Mount) -> handoff.Staged | handoff.StagedTree:
        """A read-only mount's content in the store: by its tree when it is in blobs already, else from here."""
        if mount.stored is not None:
            return handoff.stage_tree(self._store, mount.stored)
        return handoff.stage_source(self._store, mount.source)

    def _stage(self, spec: ContainerSpec, image: str, token: str, node_id: str,
               binds: list[tuple[str, str, bool]], refs: list[SecretReference], network: str | None,
               labels: dict[str, str], on_output: OutputSink) -> ExecResult:
        template = stage_template(spec, image, node_id, binds, refs, network)
        with self._lock:
            if self._stop_requests:
                return _result(Outcome.CANCELLED, None, "cancelled", _now())
        service_id = self._create(f"{token}-stage", template, {**labels, LABEL_ROLE: "stage"})
        with self._lock:
            self._stage_services[token] = service_id
        started_at = _now()
        lost = True  # until _wait says otherwise: do not wait for a task on a node that may be gone
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        with CappedLog(spec.log_path) as log:
            follower = LogFollower(self._api, service_id, StageLogSink(log, redactions(spec.secrets), on_output, tail))
            try:
                deadline = time.monotonic() + spec.timeout_s if spec.timeout_s else None
                task, why = self._wait(service_id, token, deadline, self._settings.pending_timeout_s,
                                       watch_node=True)
                lost = why.startswith(f"{NODE_LOST} ")
                timed_out = why == "deadline"
                with self._lock:
                    cancelled = token in self._cancelled
                follower.finish(catch_up=not lost)  # a lost node's last lines are gone with it
            finally:
                follower.stop()
                self._remove_service(service_id, wait=not lost)
        ran_on = RanOn("swarm", self._hostname(node_id), str(task.get("ID") or "") or None)
        if why and why not in ("deadline", "cancelled"):
            return replace(_result(Outcome.ERROR, None, why, started_at), ran_on=ran_on,
                           node_lost=why.startswith(f"{NODE_LOST} "))
        outcome, exit_code, reason = classify_task(task, memory_bytes=spec.memory_bytes, timed_out=timed_out,
                                                   cancelled=cancelled, timeout_s=spec.timeout_s, tail=list(tail))
        return replace(_result(outcome, exit_code, reason, started_at,
                               disk_full=outcome is Outcome.FAILED and filled_disk(tail)), ran_on=ran_on)

    def _clean_later(self, node_id: str, task_dir: str, labels: dict[str, str], secret: SecretReference) -> None:
        """A lost node's hand-off folder: a clean task pinned to it, left pending (not waited for) until the node
        is back; the next command's sweep removes the service once its task has run (SwarmBackend.sweep)."""
        mount = DockerMount(handoff.AGENT_ROOT, self._settings.handoff_dir, type="bind")
        container = SwarmContainerSpec(
            self._settings.agent_image, command=["sh", "-c", handoff.push_script(task_dir, None, "", "")],
            mounts=[mount], labels={**labels, LABEL_ROLE: "clean"}, init=True)
        template = TaskTemplate(container, resources=Resources(mem_limit=AGENT_MEMORY),
                                restart_policy=RestartPolicy(condition="none"),
                                placement=Placement(constraints=[f"node.id=={node_id}"]))
        with suppress(*ENGINE_FAULTS):
            self._create(f"{labels[LABEL_TASK]}-clean", template, {**labels, LABEL_ROLE: "clean"})

    def _hostname(self, node_id: str) -> str | None:
        """The node's host name as the swarm knows it (None if the manager cannot say)."""
        with suppress(*ENGINE_FAULTS):
            return str((self._api.inspect_node(node_id).get("Description") or {}).get("Hostname") or node_id)
        return node_id or None

    def _agent(self, name: str, script: str, labels: dict[str, str], secret: SecretReference,
               constraints: list[str], reserve: ContainerSpec | None = None,
               pending_s: float = 60.0) -> tuple[dict[str, Any], list[str]]:
        """Run a hand-off step in the agent image on the node `constraints` choose; its task and log lines."""
        mount = DockerMount(handoff.AGENT_ROOT, self._settings.handoff_dir, type="bind")
        container = SwarmContainerSpec(
            self._settings.agent_image, command=["sh", "-c", script], mounts=[mount], secrets=[secret],
            env={"RCLONE_CONFIG": f"{SECRETS_TARGET}/rclone.conf", "HOME": "/tmp"},
            labels={**labels, LABEL_ROLE: "agent"}, init=True,
        )
        res = Resources(mem_limit=AGENT_MEMORY)
        if reserve is not None:  # the fetch task stands in for the stage when the scheduler picks a node
            res = Resources(mem_limit=max(AGENT_MEMORY, reserve.memory_bytes or 0),
                            cpu_reservation=int(reserve.cpus * 1e9) if reserve.cpus else None,
                            mem_reservation=reserve.memory_bytes,
                            generic_resources=_gpus(reserve.gpus))
        template = TaskTemplate(container, resources=res, restart_policy=RestartPolicy(condition="none"),
                                placement=Placement(constraints=constraints))
        service_id = self._create(name, template, {**labels, LABEL_ROLE: "agent"})
        lost = True
        try:
            task, why = self._wait(service_id, None, None, pending_s, watch_node=True)
            lost = why.startswith(f"{NODE_LOST} ")
            lines = [] if lost else self._read_logs(service_id)
            if why:
                task = {**task, "Status": {**(task.get("Status") or {}), "Err": why}}
            return task, lines
        finally:
            self._remove_service(service_id, wait=not lost)

    # -- engine calls --------------------------------------------------------------------------------------

    def _create(self, name: str, template: TaskTemplate, labels: dict[str, str]) -> str:
        return str(self._api.create_service(template, name=name, labels=labels,
                                                   mode=ServiceMode("replicated", replicas=1))["ID"])

    def _wait(self, service_id: str, token: str | None, deadline: float | None, pending_s: float,
              watch_node: bool) -> tuple[dict[str, Any], str]:
        """Poll until the service's task is terminal; (task, "") then, else the task and why pipe stopped it:
        "deadline", "cancelled", a lost node (a reason starting with NODE_LOST) or a pending deadline."""
        created = time.monotonic()
        next_node_check = created
        task: dict[str, Any] = {}
        while True:
            tasks = self._api.tasks(filters={"service": service_id})
            if tasks:
                task = max(tasks, key=lambda t: str(t.get("CreatedAt", "")))
                state = (task.get("Status") or {}).get("State", "")
                if state in TERMINAL:
                    return task, ""
                node_id = task.get("NodeID")
                now = time.monotonic()
                if state == "pending" and now - created > pending_s:
                    why = (task.get("Status") or {}).get("Err") or "no node can take it"
                    return task, f"not scheduled within {pending_s:g}s: {why}"
                if watch_node and node_id and now >= next_node_check:
                    next_node_check = now + NODE_CHECK_S
                    node = self._api.inspect_node(node_id)
                    if (node.get("Status") or {}).get("State") == "down":
                        name = (node.get("Description") or {}).get("Hostname", node_id[:12])
                        return task, f"{NODE_LOST} {name} lost (down) while the task ran"
            if deadline is not None and time.monotonic() > deadline:
                return task, "deadline"
            if token is not None:
                with self._lock:
                    if token in self._cancelled:
                        return task, "cancelled"
            time.sleep(POLL_S)

    def _read_logs(self, service_id: str) -> list[str]:
        raw = self._api.service_logs(service_id, stdout=True, stderr=True, follow=False)
        return b"".join(raw).decode("utf-8", errors="replace").splitlines()

    def _secret(self, name: str, value: str, labels: dict[str, str], made: list[Callable[[], None]]) -> str:
        secret_id = str(self._api.create_secret(name, value.encode(), labels=labels)["ID"])
        made.append(lambda: self._remove_secret(secret_id))
        return secret_id

    def _remove_secret(self, secret_id: str) -> None:
        for _ in range(50):  # a secret in use by a service being removed is refused for a moment
            try:
                self._api.remove_secret(secret_id)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                time.sleep(0.1)

    def _network(self, token: str, labels: dict[str, str], made: list[Callable[[], None]]) -> str:
        """An internal overlay network for this one task: no route out, nobody else on it ("no network")."""
        network_id = str(self._api.create_network(f"{token}-none", driver="overlay", internal=True,
                                                         labels=labels)["Id"])
        made.append(lambda: self._remove_network(network_id))
        return network_id

    def _remove_network(self, network_id: str) -> None:
        for _ in range(100):  # in use until the task's container is gone on its node
            try:
                self._api.remove_network(network_id)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                time.sleep(0.1)

    def _remove_service(self, service_id: str, wait: bool = True) -> None:
        """Remove the service and wait (at most REMOVAL_WAIT_S) until its task is gone, which the manager
        reports once the node has removed the container: nothing is left on any node when run() returns. Not
        waited for on a lost node (it removes the container when it is back)."""
        with suppress(*ENGINE_FAULTS):
            self._api.remove_service(service_id)
            if not wait:
                return
            deadline = time.monotonic() + REMOVAL_WAIT_S
            while self._api.tasks(filters={"service": service_id}) and time.monotonic() < deadline:
                time.sleep(POLL_S / 2)


class LogFollower:
    """A stage task's output while it runs (`pipe logs -f`, the console), then whatever the stream had not yet
    brought once the task ended; every frame once, in order, through one StageLogSink.

    A followed service log stream does not end when the task does (the manager keeps it open for new tasks), so
    it cannot say it is complete. So the follow is stopped once the task is terminal, and one plain read since
    the last followed frame's timestamp brings the rest; the frames of that same timestamp already passed on are
    skipped (both reads come from the node's log file in its order). Timestamps are the daemon's own prefix."""

    FLUSH_S = 0.25  # the log file is flushed for `pipe logs -f` at most this often, not per line

    def __init__(self, api: Any, service_id: str, sink: StageLogSink) -> None:
        self._api, self._service, self._sink = api, service_id, sink
        self._last: bytes = b""  # the last frame's timestamp, and how many frames carried it
        self._seen_at_last = 0
        self._total = 0
        self._response: Any = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _params(self, follow: bool, since: str = "0") -> dict[str, Any]:
        return {"follow": follow, "stdout": True, "stderr": True, "timestamps": True, "since": since,
                "details": False, "tail": "all"}

    def _frames(self, response: Any) -> Any:
        return self._api._multiplexed_response_stream_helper(response)  # one frame per log message

    def _follow(self) -> None:
        flushed = time.monotonic()
        with suppress(Exception):  # the stream cut by stop(), or the manager gone: finish() reads the rest
            self._response = self._api._get(self._api._url("/services/{0}/logs", self._service),
                                            params=self._params(True), stream=True)
            if self._closed.is_set():  # stop() came before the stream was there to cut
                self._response.close()
                return
            for frame in self._frames(self._response):
                if self._closed.is_set():
                    return
                self._pass(frame)
                if time.monotonic() - flushed > self.FLUSH_S:
                    self._sink.flush()
                    flushed = time.monotonic()

    def _pass(self, frame: bytes) -> None:
        stamp, _, line = frame.partition(b" ")
        self._total += 1
        if stamp == self._last:
            self._seen_at_last += 1
        else:
            self._last, self._seen_at_last = stamp, 1
        self._sink.feed(line)

    def stop(self) -> None:
        """Cut the followed stream and wait for its thread (idempotent)."""
        self._closed.set()
        response = self._response
        if response is not None:
            with suppress(Exception):
                sock = self._api._get_raw_response_socket(response)
                getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)
            with suppress(Exception):
                response.close()
        self._thread.join(timeout=10)

    def finish(self, catch_up: bool) -> None:
        """The task is terminal: stop following, read what the follow had not brought, pass the last lines on."""
        self.stop()
        if catch_up and not self._thread.is_alive():
            since = _unix(self._last) if self._last else "0"
            if since is None:  # a timestamp this code cannot read: read it all again, drop what was passed on
                since, drop, last, skip = "0", self._total, b"", 0
            else:
                drop, last, skip = 0, self._last, self._seen_at_last
            response = self._api._get(self._api._url("/services/{0}/logs", self._service),
                                      params=self._params(False, since), stream=True)
            try:
                for frame in self._frames(response):
                    stamp = frame.partition(b" ")[0]
                    if drop:
                        drop -= 1
                    elif stamp == last and skip:
                        skip -= 1
                    elif not stamp < last:  # fixed-width UTC stamps order as bytes
                        self._pass(frame)
            finally:
                response.close()
        self._sink.close()
        self._sink.flush()


def _unix(stamp: bytes) -> str | None:
    """`2026-12-02T10:00:00.123456789Z` (the daemon's fixed-width RFC 3339, UTC) -> `1796205600.123456789`."""
    text = stamp.decode("ascii", errors="replace")
    try:
        whole = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    fraction = text[20:-1] if text.endswith("Z") and text[19:20] == "." else None
    if fraction is None or not fraction.isdigit():
        return None
    return f"{int(whole.timestamp())}.{fraction.ljust(9, '0')}"


def _gpus(count: int) -> Any:
    return {"gpu": count} if count else None


def _now() -> datetime:
    return datetime.now(UTC)


def _result(outcome: Outcome, exit_code: int | None, reason: str, started_at: datetime,
            disk_full: bool = False) -> ExecResult:
    return ExecResult(outcome=outcome, exit_code=exit_code, reason=reason, started_at=started_at,
                      finished_at=_now(), disk_full=disk_full)

