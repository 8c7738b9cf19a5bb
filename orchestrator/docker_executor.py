"""Runs one ContainerSpec in a Docker container: caps, sandbox, secrets, logs, deadline, OOM, removal; orphan sweep.

Knows nothing of pipelines, caches or history: it gets a ContainerSpec and returns an ExecResult.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import urllib3.exceptions
from docker.models.containers import Container
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount

from orchestrator.errors import EngineError
from orchestrator.executor import (
    DISK_FULL,
    LABEL_HOST,
    LABEL_MANAGED,
    LABEL_PID,
    LABEL_PIPELINE,
    LABEL_RUN,
    ContainerSpec,
    ExecResult,
    Outcome,
    OutputSink,
    RanOn,
    starter_alive,
)
from orchestrator.hostfiles import (
    TAIL_LINES,
    CappedLog,
    StageLogSink,
    parse_owner,
    redactions,
    remove_secrets,
    secrets_dir,
)
from orchestrator.units import format_bytes, format_duration

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this
SECRETS_TARGET = "/run/secrets"
ENOSPC_TEXT = "no space left on device"
# What an engine fault looks like from the SDK: its own errors, requests' (OSError) and urllib3's.
ENGINE_FAULTS = (docker.errors.DockerException, OSError, urllib3.exceptions.HTTPError)
ENGINE_HINT = "is the Docker engine (dockerd) running, and may you use its socket?"


def unreachable(error: BaseException, where: str = "") -> EngineError:
    """The one-line EngineError for an engine that did not answer."""
    return EngineError(f"docker engine unreachable{where}: {short_reason(error)}; {ENGINE_HINT}")


def connect(base_url: str | None = None, timeout_s: float = 5) -> docker.DockerClient:
    """A client that answered a ping; EngineError naming the socket within about timeout_s otherwise."""
    address = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    try:
        if base_url:
            client = docker.DockerClient(base_url=base_url, timeout=int(timeout_s), max_pool_size=64)
        else:
            client = docker.from_env(timeout=int(timeout_s), max_pool_size=64)
        client.api.ping()
    except ENGINE_FAULTS as e:
        raise unreachable(e, f" at {address}") from e
    client.api.timeout = 120  # the short timeout was for the ping; a busy engine may take longer to create
    return client


def short_reason(error: BaseException) -> str:
    """One line from a chain of SDK, requests and socket errors: the innermost OS error when there is one."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        for arg in getattr(seen, "args", ()):
            if isinstance(arg, OSError) and arg.strerror:
                return arg.strerror
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, docker.errors.APIError) and error.explanation:
        text = str(error.explanation)
    else:
        text = str(error) or type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def host_kwargs(spec: ContainerSpec, secrets_dir: Path | None = None) -> dict[str, Any]:
    """The keyword arguments of containers.create for `spec`: caps, sandbox, mounts, labels. Pure.

    The sandbox is not optional here: no capabilities, no-new-privileges, read-only root with a capped /tmp,
    no network unless asked, never privileged or in a host namespace (the engine's default seccomp applies).
    """
    mounts = [DockerMount(m.target, str(m.source), type="bind", read_only=m.read_only) for m in spec.mounts]
    if secrets_dir is not None:
        mounts.append(DockerMount(SECRETS_TARGET, str(secrets_dir), type="bind", read_only=True))
    kwargs: dict[str, Any] = {
        "command": list(spec.command) if spec.command is not None else None,
        "environment": {"HOME": "/tmp", **spec.env},
        "working_dir": spec.workdir,
        "labels": {LABEL_MANAGED: "1", **spec.labels},
        "mounts": mounts,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "init": True,  # reaps stray children and forwards SIGTERM on timeout
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,size={spec.tmp_bytes},mode=1777"},
        "privileged": False,
        "ipc_mode": "private",
    }
    if spec.entrypoint is not None:
        kwargs["entrypoint"] = list(spec.entrypoint)
    if not spec.network:
        kwargs["network_mode"] = "none"
    if spec.user is not None:
        kwargs["user"] = spec.user
    if spec.cpus is not None:
        kwargs["nano_cpus"] = int(spec.cpus * 1e9)
    if spec.memory_bytes is not None:
        kwargs["mem_limit"] = spec.memory_bytes
        kwargs["memswap_limit"] = spec.memory_bytes  # equal: no swap
    if spec.pids is not None:
        kwargs["pids_limit"] = spec.pids
    if spec.gpus > 0:
        kwargs["device_requests"] = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
    return kwargs


def filled_disk(tail: Sequence[str]) -> bool:
    """Whether the last lines of a failed stage's output say a disk filled up."""
    return any(ENOSPC_TEXT in line.lower() for line in tail)


def classify(
    exit_code: int,
    state: Mapping[str, Any],
    *,
    memory_bytes: int | None,
    timed_out: bool,
    cancelled: bool,
    timeout_s: float | None = None,
    tail: Sequence[str] = (),
) -> tuple[Outcome, str]:
    """The outcome and its one-line reason. What pipe did itself (deadline, stop_all) wins over the exit code.

    State.OOMKilled is not trusted alone (moby/moby#38352): a 137 under a memory cap that pipe did not cause is
    taken as an OOM kill too.
    """
    if timed_out:
        return Outcome.TIMEOUT, f"timed out after {format_duration(timeout_s)}" if timeout_s else "timed out"
    if cancelled:
        return Outcome.CANCELLED, "cancelled"
    if state.get("OOMKilled") or (exit_code == 137 and memory_bytes is not None):
        cap = f" (cap {format_bytes(memory_bytes)})" if memory_bytes is not None else ""
        return Outcome.OOM, f"killed: out of memory{cap}"
    if exit_code == 0:
        return Outcome.SUCCEEDED, ""
    reason = f"exited with code {exit_code}"
    if 128 < exit_code < 128 + signal.NSIG:
        try:
            reason += f" ({signal.Signals(exit_code - 128).name})"
        except ValueError:
            pass
    if filled_disk(tail):
        reason += f": {DISK_FULL}"
    return Outcome.FAILED, reason


class DockerExecutor:
    """Runs ContainerSpecs on one engine; thread-safe, so parallel.py can run several at once.

    run: create -> register -> start -> stream logs until the container ends -> wait -> classify -> remove.
    stop_all (from any thread) stops what is registered, and makes later runs return CANCELLED at once.
    """

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._running: dict[str, Container] = {}
        self._cancelled: set[str] = set()
        self._stop_requests = 0
        self._node: str | None = None

    def run(self, spec: ContainerSpec, on_output: OutputSink) -> ExecResult:
        started_at = _now()
        if self._stop_requests:
            return _result(Outcome.CANCELLED, None, "cancelled", started_at)
        owner = self._secret_owner(spec) if spec.secrets else None
        with secrets_dir(spec.secrets, owner) as secrets_folder:
            try:
                container = self._client.containers.create(spec.image_id, **host_kwargs(spec, secrets_folder))
            except docker.errors.APIError as e:  # the engine answered but refused: this stage cannot run
                return _result(
                    Outcome.ERROR, None, f"docker engine refused the container: {short_reason(e)}", started_at
                )
            except ENGINE_FAULTS as e:
                raise unreachable(e) from e
            cid = str(container.id)
            try:
                result = self._supervise(container, cid, spec, on_output)
                return replace(result, ran_on=RanOn("local", self._node_name(), cid))
            finally:
                with self._lock:
                    self._running.pop(cid, None)
                    self._cancelled.discard(cid)
                _remove(container)

    def _node_name(self) -> str | None:
        """The engine's host name (`docker info` Name), asked once: the engine may be remote (DOCKER_HOST)."""
        if self._node is None:
            with suppress(*ENGINE_FAULTS):
                self._node = str(self._client.info().get("Name") or "")
        return self._node or None

    def stop_all(self) -> None:
        """Stop every running container of this executor (SIGTERM, SIGKILL after STOP_GRACE_S), without waiting.

        Their run() calls return CANCELLED. Safe to call repeatedly; a second call kills what is still running.
        """
        with self._lock:
            self._stop_requests += 1
            force = self._stop_requests > 1
            containers = list(self._running.values())
            self._cancelled.update(self._running)
        for container in containers:
            threading.Thread(target=_kill if force else _stop, args=(container,), daemon=True).start()

    def _supervise(
        self, container: Container, cid: str, spec: ContainerSpec, on_output: OutputSink
    ) -> ExecResult:
        with self._lock:
            if self._stop_requests:  # stop_all came between create and here
                return _result(Outcome.CANCELLED, None, "cancelled", _now())
            self._running[cid] = container
        started_at = _now()
        deadline = _Deadline(spec.timeout_s, lambda: _stop(container))
        stats = _Stats(self._client, cid)
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        try:
            # attach before start, so no output is missed; unlike logs(follow=True), which the engine sends line
            # by line, attach sends the process's writes: a stage printing gigabytes costs far fewer frames
            frames = self._client.api.attach(
                cid, stdout=True, stderr=True, stream=True, logs=True, demux=True
            )
            container.start()
            deadline.start()
            stats.start()
            self._stream(frames, spec, on_output, tail)
            exit_code = int(container.wait()["StatusCode"])
            state: dict[str, Any] = {}
            if exit_code != 0:  # only a failure needs the state (OOMKilled; removed behind pipe's back)
                container.reload()
                state = container.attrs["State"]
            if state.get("Status") == "removing":
                return _result(
                    Outcome.ERROR, exit_code, "container vanished (removed outside pipe)", started_at
                )
        except docker.errors.NotFound:
            return _result(Outcome.ERROR, None, "container vanished (removed outside pipe)", started_at)
        except ENGINE_FAULTS as e:
            return _result(
                Outcome.ERROR, None, f"docker engine failed during the run: {short_reason(e)}", started_at
            )
        finally:
            deadline.cancel()
            stats.stop()
        with self._lock:
            cancelled = cid in self._cancelled
        outcome, reason = classify(
            exit_code,
            state,
            memory_bytes=spec.memory_bytes,
            timed_out=deadline.expired,
            cancelled=cancelled,
            timeout_s=spec.timeout_s,
            tail=tail,
        )
        return _result(outcome, exit_code, reason, started_at, stats.peak_memory_bytes, stats.cpu_seconds,
                       disk_full=outcome is Outcome.FAILED and filled_disk(tail))

    def _stream(
        self,
        frames: Iterable[tuple[bytes | None, bytes | None]],
        spec: ContainerSpec,
        on_output: OutputSink,
        tail: deque[str],
    ) -> None:
        """Pass stdout and stderr on line by line until the container ends; memory is bounded by LINE_CAP_BYTES.

        Frames are the process's writes, not lines: each stream keeps its own partial line. Secrets are
        redacted before a line goes anywhere (issue 6); a long line is cut only where no secret can straddle."""
        with CappedLog(spec.log_path) as log:
            sink = StageLogSink(log, redactions(spec.secrets), on_output, tail, streams=2)  # stdout, stderr
            for frame in frames:
                for i, chunk in enumerate(frame):
                    sink.feed(chunk or b"", i)
                sink.flush()  # per frame, not per line: `pipe logs -f` sees what the stage wrote
            sink.close()

    def _secret_owner(self, spec: ContainerSpec) -> tuple[int, int] | None:
        """The uid:gid the container runs as, when numeric; None when only a name is known."""
        user = spec.user
        if user is None:
            try:
                user = self._client.images.get(spec.image_id).attrs["Config"].get("User") or ""
            except docker.errors.ImageNotFound:
                user = ""  # create will report the missing image
            except ENGINE_FAULTS as e:
                raise unreachable(e) from e
        return parse_owner(user)


class _Deadline:
    """Calls on_expiry once after timeout_s unless cancelled first; container.wait(timeout=) is only an HTTP
    read timeout (docker-py #1966), so pipe keeps its own clock."""

    def __init__(self, timeout_s: float | None, on_expiry: Callable[[], None]) -> None:
        self.expired = False
        self._on_expiry = on_expiry
        self._timer = threading.Timer(timeout_s, self._fire) if timeout_s else None
        if self._timer is not None:
            self._timer.daemon = True

    def _fire(self) -> None:
        self.expired = True
        self._on_expiry()

    def start(self) -> None:
        if self._timer is not None:
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


STATS_DELAY_S = 0.5


class _Stats:
    """Samples the engine's stats stream in a daemon thread: peak memory and CPU seconds (cgroup v1 and v2).

    The stream ends when the container is removed; stop() only makes the thread ignore later samples. A container
    too short for one sample gives None for both.
    """

    def __init__(self, client: docker.DockerClient, container_id: str) -> None:
        self._client, self._id = client, container_id
        self._done = threading.Event()
        self.peak_memory_bytes: int | None = None
        self.cpu_seconds: float | None = None

    def start(self) -> None:
        threading.Thread(target=self._sample, name=f"stats-{self._id[:12]}", daemon=True).start()

    def stop(self) -> None:
        self._done.set()

    def _sample(self) -> None:
        if self._done.wait(STATS_DELAY_S):  # a short stage ends before the engine's first sample anyway
            return
        try:
            for sample in self._client.api.stats(self._id, stream=True, decode=True):
                if self._done.is_set():
                    return
                self._take(sample)
        except ENGINE_FAULTS:
            return  # the container went away; what was sampled stands

    def _take(self, sample: Mapping[str, Any]) -> None:
        memory = sample.get("memory_stats") or {}
        peak = memory.get("max_usage") or memory.get("usage")  # v1 has max_usage; v2 only usage
        if peak:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, int(peak))
        total_ns = ((sample.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        if total_ns:
            self.cpu_seconds = max(self.cpu_seconds or 0.0, total_ns / 1e9)


def sweep_orphans(client: docker.DockerClient, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
    """Remove the containers of pipeline `owner` whose run is not alive; return those runs' ids, sorted.

    `is_alive(run_id)` answers from the history (the run's lease): True, False, or None when it does not know
    the run; then the container's labels decide: its pipe process on this host is dead, or it has no pid label.
    A container of another host's unknown run is left alone (that host's pipe may still run it)."""
    alive: dict[str, bool] = {}
    dead: set[str] = set()
    try:
        # the low-level list carries the labels: no inspect per container that could race with a removal
        for row in client.api.containers(
            all=True, filters={"label": [LABEL_MANAGED, f"{LABEL_PIPELINE}={owner}"]}
        ):
            labels = row.get("Labels") or {}
            run_id = str(labels.get(LABEL_RUN, ""))
            if run_id not in alive:
                known = is_alive(run_id)
                alive[run_id] = starter_alive(labels.get(LABEL_HOST), labels.get(LABEL_PID)) if known is None else known
            if not alive[run_id]:
                with suppress(docker.errors.APIError):  # gone, or removal in progress
                    client.api.remove_container(row["Id"], force=True)
                for mount in row.get("Mounts") or ():  # its pipe died before removing the secrets folder
                    source = Path(str(mount.get("Source") or "/"))
                    made_by_pipe = source.name == "secrets" and source.parent.name.startswith("pipe-secrets-")
                    if mount.get("Destination") == SECRETS_TARGET and made_by_pipe:
                        remove_secrets(source.parent)
                dead.add(run_id)
    except ENGINE_FAULTS as e:
        raise unreachable(e) from e
    return sorted(dead)


def kill_process_containers(pid: int, base_url: str | None = None) -> int:
    """Kill (SIGKILL) every running container that process `pid` of this host started; how many. For a second
    Ctrl-C, from a signal handler that cannot reach the process's executors: the labels say whose each is. The
    executors' run() calls then return (CANCELLED, as stop_all marked them) and remove their containers."""
    client = connect(base_url)
    try:
        rows = client.api.containers(filters={"label": [
            LABEL_MANAGED, f"{LABEL_PID}={pid}", f"{LABEL_HOST}={os.uname().nodename}",
        ]})
        for row in rows:
            with suppress(docker.errors.APIError):  # it ended meanwhile
                client.api.kill(row["Id"])
        return len(rows)
    except ENGINE_FAULTS as e:
        raise unreachable(e) from e
    finally:
        client.close()


def _stop(container: Container) -> None:
    try:
        container.stop(timeout=int(STOP_GRACE_S))
    except ENGINE_FAULTS:
        pass  # already gone or engine lost: run() reports what happened


def _kill(container: Container) -> None:
    try:
        container.kill()
    except ENGINE_FAULTS:
        pass


def _remove(container: Container) -> None:
    try:
        container.remove(force=True)
    except ENGINE_FAULTS:
        pass  # gone already, removal in progress elsewhere, or the engine is lost (the next sweep removes it)


def _now() -> datetime:
    return datetime.now(UTC)


def _result(
    outcome: Outcome,
    exit_code: int | None,
    reason: str,
    started_at: datetime,
    peak_memory_bytes: int | None = None,
    cpu_seconds: float | None = None,
    disk_full: bool = False,
) -> ExecResult:
    return ExecResult(
        outcome=outcome,
        exit_code=exit_code,
        reason=reason,
        started_at=started_at,
        finished_at=_now(),
        peak_memory_bytes=peak_memory_bytes,
        cpu_seconds=cpu_seconds,
        disk_full=disk_full,
    )


def gpu_problem(client: docker.DockerClient) -> str | None:
    """Why this engine cannot give a container GPUs (`resources.gpus`), or None when it can: device requests
    for GPUs need the nvidia runtime (nvidia-container-toolkit) or CDI specs. EngineError if it does not answer."""
    try:
        info = client.info()
    except ENGINE_FAULTS as e:
        raise EngineError(f"docker engine did not answer `docker info`: {short_reason(e)}") from e
    runtimes = sorted(info.get("Runtimes") or {})
    if "nvidia" in runtimes or info.get("CDISpecDirs"):
        return None
    return (f"the engine has no GPU runtime (runtimes: {', '.join(runtimes) or 'none'}): install the "
            "nvidia-container-toolkit and restart the engine, or set gpus: 0")


def pod_image(client: docker.DockerClient, image: str) -> str:
    """A local image as a cluster node names it: the first `repo@sha256:` digest (pushed to a registry), else
    the immutable id. EngineError if the engine does not answer; the name itself if the image is unknown."""
    try:
        attrs = client.images.get(image).attrs
    except docker.errors.ImageNotFound:
        return image
    except ENGINE_FAULTS as e:
        raise EngineError(f"docker engine unreachable: {short_reason(e)}") from e
    digests = attrs.get("RepoDigests") or []
    return str(digests[0]) if digests else str(attrs["Id"])
