"""DockerExecutor against the real engine: outcomes, caps, timeout, cancel, faults, logs; never a container left."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from orchestrator.docker_executor import DockerExecutor, connect, sweep_orphans
from orchestrator.errors import EngineError
from orchestrator.executor import (
    LABEL_MANAGED,
    LABEL_PIPELINE,
    LABEL_RUN,
    ContainerSpec,
    ExecResult,
    Mount,
    Outcome,
    SecretFile,
)
from tests.conftest import BUSYBOX, wait_for
from tests.integration.conftest import run

MiB = 1024**2


def sh(script: str, labels: dict[str, str], **fields: Any) -> ContainerSpec:
    return ContainerSpec(
        name="stage", image_id=BUSYBOX, command=("sh", "-c", script), labels=labels, **fields
    )


def running_container(docker: Any, tmp_path: Path) -> Any:
    found = docker.containers.list(
        ignore_removed=True, filters={"label": f"{LABEL_PIPELINE}={tmp_path}", "status": "running"}
    )
    return found[0] if found else None


@pytest.fixture
def in_background() -> Iterator[Callable[[Callable[[], ExecResult]], Callable[[], ExecResult]]]:
    """Run a call in a thread; returns a function that joins it and gives its result."""
    threads: list[threading.Thread] = []

    def start(call: Callable[[], ExecResult]) -> Callable[[], ExecResult]:
        box: list[ExecResult] = []
        thread = threading.Thread(target=lambda: box.append(call()), daemon=True)
        thread.start()
        threads.append(thread)

        def join() -> ExecResult:
            thread.join(timeout=60)
            assert box, "run() did not return"
            return box[0]

        return join

    yield start
    for thread in threads:
        thread.join(timeout=60)


def test_success_streams_stdout_and_stderr_lines_and_saves_the_log(
    executor: DockerExecutor, labels: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "stage.log"
    result, lines = run(executor, sh("echo one; echo two >&2; printf 'no newline'", labels, log_path=log))
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.SUCCEEDED, 0, "")
    assert sorted(lines) == ["no newline", "one", "two"]
    assert sorted(log.read_text().splitlines()) == ["no newline", "one", "two"]
    assert result.finished_at >= result.started_at


def test_non_zero_exit_fails_with_the_code(executor: DockerExecutor, labels: dict[str, str]) -> None:
    result, _ = run(executor, sh("exit 3", labels))
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.FAILED, 3, "exited with code 3")


def test_allocating_past_the_memory_cap_is_an_oom_kill(
    executor: DockerExecutor, labels: dict[str, str]
) -> None:
    # dd fills a 200 MiB buffer from /dev/zero: resident memory well past the 64 MiB cap
    result, _ = run(
        executor, sh("dd if=/dev/zero of=/dev/null bs=200M count=1", labels, memory_bytes=64 * MiB)
    )
    assert result.outcome is Outcome.OOM
    assert result.reason == "killed: out of memory (cap 64 MiB)"


def test_the_same_allocation_without_a_cap_succeeds(executor: DockerExecutor, labels: dict[str, str]) -> None:
    result, _ = run(
        executor, sh("dd if=/dev/zero of=/dev/null bs=200M count=1", labels, memory_bytes=512 * MiB)
    )
    assert result.outcome is Outcome.SUCCEEDED


def test_cpu_cap_is_visible_inside(executor: DockerExecutor, labels: dict[str, str]) -> None:
    script = (
        "if [ -f /sys/fs/cgroup/cpu.max ]; then cat /sys/fs/cgroup/cpu.max; "
        "else echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); fi"
    )
    result, lines = run(executor, sh(script, labels, cpus=0.5))
    assert result.outcome is Outcome.SUCCEEDED
    quota, period = (int(x) for x in lines[-1].split())
    assert quota / period == 0.5


def test_pids_and_memory_caps_are_visible_inside(executor: DockerExecutor, labels: dict[str, str]) -> None:
    script = (
        "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; "
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"
    )
    result, lines = run(executor, sh(script, labels, pids=40, memory_bytes=96 * MiB))
    assert result.outcome is Outcome.SUCCEEDED
    assert lines == ["40", str(96 * MiB)]


def test_timeout_stops_the_container_and_returns_promptly(
    executor: DockerExecutor, labels: dict[str, str]
) -> None:
    result, _ = run(executor, sh("sleep 30", labels, timeout_s=1))
    assert result.outcome is Outcome.TIMEOUT
    assert result.reason == "timed out after 1.00s"
    assert result.duration_s < 25  # the sleep would take 30 s: the deadline, not the command, ended it


def test_stop_all_from_another_thread_cancels(
    executor: DockerExecutor, labels: dict[str, str], docker: Any, tmp_path: Path, in_background: Any
) -> None:
    join = in_background(lambda: executor.run(sh("sleep 30", labels), lambda _: None))
    wait_for(lambda: running_container(docker, tmp_path), what="the container to run")
    executor.stop_all()
    executor.stop_all()  # idempotent: a second call only escalates to a kill
    result = join()
    assert result.outcome is Outcome.CANCELLED
    assert result.reason == "cancelled"
    after, _ = run(executor, sh("true", labels))  # a stopped executor starts nothing new
    assert after.outcome is Outcome.CANCELLED


def test_read_only_mount_cannot_be_written(
    executor: DockerExecutor, labels: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "raw.csv").write_text("a,b\n1,2\n")
    mounts = (Mount(data, "/workspace/data", read_only=True),)
    result, lines = run(
        executor, sh("echo x >> /workspace/data/raw.csv; touch /workspace/data/new", labels, mounts=mounts)
    )
    assert result.outcome is Outcome.FAILED
    assert any("Read-only file system" in line for line in lines)
    assert (data / "raw.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in data.iterdir()) == ["raw.csv"]


def test_writable_output_mount_receives_files(
    executor: DockerExecutor, labels: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result, _ = run(
        executor, sh("echo 42 > /outputs/answer", labels, mounts=(Mount(out, "/outputs", False),))
    )
    assert result.outcome is Outcome.SUCCEEDED
    assert (out / "answer").read_text() == "42\n"


def test_container_removed_behind_pipes_back_is_an_error(
    executor: DockerExecutor, labels: dict[str, str], docker: Any, tmp_path: Path, in_background: Any
) -> None:
    join = in_background(lambda: executor.run(sh("sleep 30", labels, timeout_s=60), lambda _: None))
    container = wait_for(lambda: running_container(docker, tmp_path), what="the container to run")
    container.remove(force=True)
    result = join()
    assert result.outcome is Outcome.ERROR
    assert result.reason == "container vanished (removed outside pipe)"


def test_missing_image_is_an_error_naming_the_engine(
    executor: DockerExecutor, labels: dict[str, str]
) -> None:
    spec = ContainerSpec(name="stage", image_id="sha256:" + "0" * 64, command=("true",), labels=labels)
    result, _ = run(executor, spec)
    assert result.outcome is Outcome.ERROR
    assert result.reason.startswith("docker engine refused the container: ")


def test_log_is_capped_with_a_marker_while_every_line_streams(
    executor: DockerExecutor, labels: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "stage.log"
    # 12 MiB of 1 KiB lines: 12288 lines
    script = "line=$(head -c 1023 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 12288 ]; do echo $line; i=$((i+1)); done"
    counted = [0]

    def count(_line: str) -> None:
        counted[0] += 1

    result = executor.run(sh(script, labels, log_path=log), count)
    assert result.outcome is Outcome.SUCCEEDED
    assert counted[0] == 12288
    stored = log.read_bytes()
    assert stored.endswith(b"\n[pipe: log truncated after 10 MiB]\n")
    assert len(stored) <= 10 * MiB + 100


def test_printing_a_lot_keeps_pipes_memory_flat(executor: DockerExecutor, labels: dict[str, str]) -> None:
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = [0]

    def count(line: str) -> None:
        total[0] += len(line) + 1

    # 96 MiB as one endless line (no newline at all), then 16 MiB of short lines
    script = "head -c 96m /dev/zero | tr '\\0' x; echo; yes 0123456789abcdef0123456789abcdef | head -c 16m"
    result = executor.run(sh(script, labels), count)
    assert result.outcome is Outcome.SUCCEEDED
    assert total[0] >= 112 * MiB
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024
    assert grown_mib < 48, f"pipe grew by {grown_mib:.0f} MiB while streaming 112 MiB"


def test_fork_bomb_under_a_pids_cap_fails_and_the_host_stays_fine(
    executor: DockerExecutor, labels: dict[str, str]
) -> None:
    bomb = "i=0; while [ $i -lt 500 ]; do sleep 60 & i=$((i+1)); done; wait"
    result, lines = run(executor, sh(bomb, labels, pids=32, timeout_s=30))
    assert result.outcome is Outcome.FAILED  # not TIMEOUT: the cap stopped it, not the deadline
    assert any("fork" in line for line in lines)
    after, _ = run(executor, sh("true", labels))
    assert after.outcome is Outcome.SUCCEEDED


def test_disk_full_names_enospc(executor: DockerExecutor, labels: dict[str, str]) -> None:
    result, _ = run(executor, sh("dd if=/dev/zero of=/tmp/big bs=1M count=4", labels, tmp_bytes=1 * MiB))
    assert result.outcome is Outcome.FAILED
    assert result.disk_full and result.reason.endswith("no space left on device (ENOSPC)")


def test_peak_memory_and_cpu_are_sampled(executor: DockerExecutor, labels: dict[str, str]) -> None:
    # 40 MiB held on the /tmp tmpfs (charged to the container) for long enough for the engine's 1 s samples
    result, _ = run(executor, sh("head -c 40m /dev/zero > /tmp/f; sleep 3", labels, memory_bytes=256 * MiB))
    assert result.outcome is Outcome.SUCCEEDED
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes >= 40 * MiB
    assert result.cpu_seconds is not None and result.cpu_seconds > 0


def test_sweep_orphans_removes_containers_of_dead_runs_only(docker: Any, tmp_path: Path) -> None:
    owner = str(tmp_path)
    for run_id in ("dead-run", "live-run"):
        docker.containers.create(
            BUSYBOX, ["sleep", "30"], labels={LABEL_MANAGED: "1", LABEL_PIPELINE: owner, LABEL_RUN: run_id}
        )
    other = docker.containers.create(
        BUSYBOX, ["true"], labels={LABEL_MANAGED: "1", LABEL_PIPELINE: owner + "-other", LABEL_RUN: "x"}
    )
    try:
        assert sweep_orphans(docker, owner, is_alive=lambda run_id: run_id == "live-run") == ["dead-run"]
        left = docker.containers.list(
            all=True, ignore_removed=True, filters={"label": f"{LABEL_PIPELINE}={owner}"}
        )
        assert [c.labels[LABEL_RUN] for c in left] == ["live-run"]
        assert sweep_orphans(docker, owner, is_alive=lambda run_id: False) == ["live-run"]
    finally:
        other.remove(force=True)


def test_connect_to_a_missing_socket_fails_fast_naming_it(tmp_path: Path) -> None:
    socket = f"unix://{tmp_path}/nothing.sock"
    with pytest.raises(EngineError) as info:
        connect(socket, timeout_s=2)
    assert str(info.value).startswith(f"docker engine unreachable at {socket}: ")
    assert str(info.value).endswith("; is the Docker engine (dockerd) running, and may you use its socket?")
    assert "\n" not in str(info.value)


def test_connect_to_the_running_engine(docker: Any) -> None:
    assert connect().api.ping()


class PrivateEngine:
    """A throwaway dockerd on its own socket and folders (issue 5): killed and restarted by a test, never the shared
    engine. It lives in its own network namespace: dockerd with --bridge=none deletes any interface named docker0
    it can see (moby daemon_unix.go removeDefaultBridgeInterface), which would break the shared engine's bridge."""

    def __init__(self) -> None:
        self.root = Path(
            tempfile.mkdtemp(prefix="pipe-dockerd-", dir="/tmp")
        )  # short: a socket path has a limit
        self.url = f"unix://{self.root}/docker.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        r = self.root
        argv = ["unshare", "--net", "dockerd", "--host", self.url, "--data-root", f"{r}/data",
                "--exec-root", f"{r}/exec", "--pidfile", f"{r}/docker.pid", "--bridge", "none",
                "--iptables=false", "--ip-masq=false", "--storage-driver", "vfs"]  # fmt: skip
        with open(r / "dockerd.log", "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout=60, what=f"a private dockerd on {self.url}")

    def _answers(self) -> bool:
        try:
            connect(self.url, timeout_s=1).close()
        except EngineError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL dockerd, as a crash would; then wait for its containerd to go too, so a restart starts afresh."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        pid = int(pidfile.read_text())
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _dead_or_zombie(pid), what="the private containerd to exit")
        # this machine's PID 1 does not reap orphans: a zombie containerd would look alive to the next dockerd
        pidfile.unlink()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        for pid in self._pids_under_root(("containerd", "dockerd")):  # shims of a killed daemon, if any
            os.kill(pid, signal.SIGKILL)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", point], check=False)  # its data root bind mount, network namespaces
        shutil.rmtree(self.root, ignore_errors=True)

    def _pids_under_root(self, prefixes: tuple[str, ...]) -> list[int]:
        """Processes of this private engine only: their command line names its folder."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if (
                entry.name.isdigit()
                and Path(argv[0]).name.startswith(prefixes)
                and str(self.root) in " ".join(argv)
            ):
                found.append(int(entry.name))
        return found


def _dead_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def private_engine(docker: Any) -> Iterator[tuple[PrivateEngine, Any]]:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("unshare"):
        pytest.fail(
            "the engine-fault test needs root, dockerd and unshare (scripts/engine.sh installs dockerd)"
        )
    engine = PrivateEngine()
    try:
        engine.start()
        client = connect(engine.url)
        client.images.load(b"".join(docker.images.get(BUSYBOX).save(named=True)))
        yield engine, client
    finally:
        engine.close()


def test_engine_lost_mid_stage_is_an_infrastructure_error_and_the_next_run_recovers(
    private_engine: tuple[PrivateEngine, Any], tmp_path: Path, in_background: Any
) -> None:
    engine, client = private_engine
    owner = str(tmp_path)
    labels = {LABEL_MANAGED: "1", LABEL_PIPELINE: owner, LABEL_RUN: "run-1"}
    executor = DockerExecutor(client)
    spec = sh("echo started; sleep 30", labels, secrets=(SecretFile("TOKEN", "value"),))
    started = threading.Event()
    join = in_background(lambda: executor.run(spec, lambda line: started.set()))
    wait_for(started.is_set, what="the stage to start")
    secrets_dirs = list(Path("/dev/shm").glob("pipe-secrets-*/secrets/TOKEN"))
    engine.kill()
    result = join()
    assert result.outcome is Outcome.ERROR
    assert result.reason.startswith("docker engine failed during the run: ")
    assert secrets_dirs and not any(p.exists() for p in secrets_dirs)  # removed on this path too
    with pytest.raises(EngineError, match="^docker engine unreachable: "):
        executor.run(sh("true", labels), lambda _: None)  # down before create: an EngineError, not a result

    engine.start()
    again = connect(engine.url)
    assert sweep_orphans(again, owner, is_alive=lambda run_id: False) == ["run-1"]
    assert again.containers.list(all=True, filters={"label": f"{LABEL_PIPELINE}={owner}"}) == []
    after = DockerExecutor(again).run(sh("echo back", labels), lambda _: None)
    assert after.outcome is Outcome.SUCCEEDED
