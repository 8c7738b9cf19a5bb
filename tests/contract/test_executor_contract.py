"""One contract for every executor (issue 16): the same ContainerSpecs on the local engine and on a real 3-node
swarm give the same outcomes, exit codes, caps, mounts and cleanup. Real containers, nothing faked."""

from __future__ import annotations

import threading
from pathlib import Path

from orchestrator.executor import ExecResult, Mount, Outcome
from tests.conftest import wait_for
from tests.contract.conftest import Harness


def test_success_comes_with_its_output(harness: Harness) -> None:
    result, lines = harness.run(harness.spec("hello", "echo out-line; echo err-line >&2"))
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.SUCCEEDED, 0, "")
    assert sorted(lines) == ["err-line", "out-line"]


def test_the_exact_exit_code_is_reported(harness: Harness) -> None:
    result, _ = harness.run(harness.spec("three", "exit 3"))
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.FAILED, 3, "exited with code 3")


def test_a_container_that_never_started_is_an_error_not_exit_0(harness: Harness) -> None:
    missing = "sha256:" + "0" * 64
    result, _ = harness.run(harness.spec("nostart", "true", image=missing))
    assert result.outcome is Outcome.ERROR
    assert result.exit_code is None
    assert result.reason


def test_memory_over_the_cap_is_an_oom(harness: Harness) -> None:
    result, _ = harness.run(harness.spec("oom", "echo start; tail /dev/zero", memory_bytes=32 << 20))
    assert result.outcome is Outcome.OOM
    assert "out of memory" in result.reason and "32 MiB" in result.reason


def test_cpu_memory_and_pids_caps_are_in_the_containers_cgroup(harness: Harness) -> None:
    read = ("cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
            "/sys/fs/cgroup/cpu/cpu.cfs_period_us /sys/fs/cgroup/pids/pids.max")
    result, lines = harness.run(harness.spec("caps", read, memory_bytes=64 << 20, cpus=0.5, pids=77))
    assert result.outcome is Outcome.SUCCEEDED
    memory, quota, period, pids = lines
    assert int(memory) == 64 << 20
    assert int(quota) / int(period) == 0.5
    if harness.enforces("pids"):
        assert pids == "77"
    else:  # no pod field for it (Kubernetes): the documented warning instead, never silence
        assert harness.warned(result, "pids"), result.warnings


def test_inputs_are_read_only_outputs_writable_and_come_back_to_the_host(harness: Harness, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "x.txt").write_text("input-bytes\n")
    (tmp_path / "one.csv").write_text("a,b\n1,2\n")
    out = tmp_path / "out"
    out.mkdir()
    script = ("cat /inputs/up/sub/x.txt /workspace/one.csv; touch /inputs/up/new 2>/dev/null && echo WROTE-INPUT; "
              "mkdir /outputs/d; cp /inputs/up/sub/x.txt /outputs/d/copy.txt; echo ok > /outputs/flag")
    mounts = (Mount(out, "/outputs", read_only=False), Mount(data, "/inputs/up"),
              Mount(tmp_path / "one.csv", "/workspace/one.csv"))
    result, lines = harness.run(harness.spec("io", script, mounts=mounts))
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert lines == ["input-bytes", "a,b", "1,2"]
    assert (out / "d" / "copy.txt").read_text() == "input-bytes\n"
    assert (out / "flag").read_text() == "ok\n"
    assert sorted(p.name for p in data.rglob("*")) == ["sub", "x.txt"]


def test_the_deadline_is_enforced_by_pipe(harness: Harness) -> None:
    result, _ = harness.run(harness.spec("slow", "sleep 60", timeout_s=2))
    assert result.outcome is Outcome.TIMEOUT
    assert result.reason.startswith("timed out after 2")
    assert result.duration_s < 30


def test_cancel_stops_the_stage_and_leaves_nothing(harness: Harness) -> None:
    outcome: list[Outcome] = []
    worker = threading.Thread(target=lambda: outcome.append(harness.run(harness.spec("long", "sleep 60"))[0].outcome))
    worker.start()
    wait_for(lambda: any(c.containers.list(filters={"label": "dev.pipe.stage=long"}) for c in harness.clients),
             timeout=60, what="the stage's container")
    harness.executor.stop_all()
    worker.join(60)
    assert outcome == [Outcome.CANCELLED]
    # the harness fixture asserts that no container, service, secret or network of this test is left anywhere


def test_no_network_unless_asked(harness: Harness) -> None:
    probe = "ip -o -4 addr show | grep -v ' lo ' | wc -l; ip route | grep -c default || true"
    result, lines = harness.run(harness.spec("net", probe))
    assert result.outcome is Outcome.SUCCEEDED
    if harness.enforces("network"):
        assert lines[-1] == "0"  # no route out, whatever interface the engine gives
    else:  # a pod always has the cluster's network (Kubernetes): the documented warning instead
        assert lines[-1] == "1" and harness.warned(result, "network"), (lines, result.warnings)


def test_the_sandbox_fields_are_applied(harness: Harness) -> None:
    probe = "id -u; grep CapEff /proc/self/status; touch /rootfs-write 2>/dev/null || echo ro-root; ps -o comm | sed -n 2p"
    result, lines = harness.run(harness.spec("sandbox", probe))
    assert result.outcome is Outcome.SUCCEEDED
    import os

    assert lines[:3] == [str(os.getuid()), "CapEff:\t0000000000000000", "ro-root"]
    if harness.enforces("init"):
        assert lines[3] == "docker-init"  # init: PID 1 reaps and forwards signals
    else:  # no pod field for an init (Kubernetes): the stage's shell is PID 1, and the warning says so
        assert lines[3] == "sh" and harness.warned(result, "init"), (lines, result.warnings)


def test_a_200_mb_log_comes_back_capped_and_intact(harness: Harness, tmp_path: Path) -> None:
    import resource

    from orchestrator.hostfiles import LOG_CAP_BYTES

    lines, width = 200_000, 1000  # 200 MB in numbered 1000-byte lines
    script = (f"awk 'BEGIN{{s=sprintf(\"%{width - 10}s\",\"\"); gsub(/ /,\"x\",s); "
              f"for(i=1;i<={lines};i++) printf \"%08d %s\\n\", i, s}}'; echo END")
    seen = {"count": 0, "last": "", "broken": 0}

    def sink(line: str) -> None:  # counts, never keeps: the test holds no more of the log than pipe should
        seen["count"] += 1
        if line != "END" and (len(line) != width - 1 or int(line[:8]) != seen["count"]):
            seen["broken"] += 1
        seen["last"] = line

    log = tmp_path / "big.log"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    result = harness.executor.run(harness.spec("loud", script, log_path=log, timeout_s=900), sink)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    assert (seen["count"], seen["broken"], seen["last"]) == (lines + 1, 0, "END")  # every line, whole, in order
    stored = log.read_bytes()
    assert LOG_CAP_BYTES - width < len(stored) <= LOG_CAP_BYTES + 100  # capped at 10 MiB and a marker line
    body, marker = stored.rstrip(b"\n").rsplit(b"\n", 1)
    assert marker.startswith(b"[pipe: log truncated after 10 MiB]")
    for i, line in enumerate(body.split(b"\n"), start=1):  # what is stored is intact, from the first line
        assert line[:8] == b"%08d" % i and len(line) == width - 1
    assert grew < 100 << 20, f"the process grew by {grew >> 20} MiB reading a 200 MB log"


def test_independent_stages_run_in_parallel(harness: Harness) -> None:
    n = 3
    spans: dict[str, list[float]] = {}

    def one(i: int) -> None:
        lines = harness.run(harness.spec(f"fan{i}", "date +%s; sleep 10; date +%s", timeout_s=600))[1]
        spans[f"fan{i}"] = [float(x) for x in lines[-2:]]

    workers = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    assert len(spans) == n, spans
    latest_start, earliest_end = max(s for s, _ in spans.values()), min(e for _, e in spans.values())
    # all ran at one moment (wall clock seconds from inside each container: the nodes' clocks)
    assert latest_start < earliest_end, f"the stages did not overlap in time: {spans}"


def test_a_printed_secret_is_redacted_in_a_short_line_and_in_a_long_lines_pieces(harness: Harness, tmp_path: Path) -> None:
    import uuid

    from orchestrator.executor import SecretFile
    from orchestrator.hostfiles import LINE_CAP_BYTES

    value = f"s3cr3t-{uuid.uuid4().hex}"
    pad = LINE_CAP_BYTES - len(value) // 2  # the secret lies across where the long line is cut into pieces
    script = (f"cat /run/secrets/TOKEN; echo; head -c {pad} /dev/zero | tr '\\0' x; cat /run/secrets/TOKEN; "
              "echo yy; echo done")
    log = tmp_path / "secret.log"
    result, lines = harness.run(harness.spec("tell", script, log_path=log, timeout_s=300,
                                             secrets=(SecretFile("TOKEN", value),)))
    assert result.outcome is Outcome.SUCCEEDED, result.reason
    shown, stored = "\n".join(lines), log.read_text()
    for text in (shown, stored):
        assert value not in text.replace("\n", ""), "the secret, or its two halves, came through"
        assert value[:12] not in text and value[-12:] not in text
    assert lines[0] == "***" and lines[-1] == "done", lines[:1] + lines[-2:]
    assert "".join(lines[1:-1]) == "x" * pad + "***yy"  # the long line, in pieces, whole apart from the secret


def test_output_arrives_while_the_stage_runs(harness: Harness, tmp_path: Path) -> None:
    """`pipe logs -f` and the console see a line when the stage prints it, not when the stage ends."""
    import time

    log = tmp_path / "live.log"
    seen: dict[str, float] = {}

    def sink(line: str) -> None:
        seen[line] = time.monotonic()

    def early_is_stored() -> bool:
        return log.exists() and b"early" in log.read_bytes()

    spec = harness.spec("live", "echo early; sleep 40; echo late", log_path=log, timeout_s=600)
    done: list[ExecResult] = []
    worker = threading.Thread(target=lambda: done.append(harness.executor.run(spec, sink)))
    worker.start()
    try:
        wait_for(lambda: "early" in seen, timeout=300, what="the first line")
        wait_for(early_is_stored, timeout=10, what="the first line in the stage's log file")
        assert "late" not in seen
    finally:
        worker.join(600)
    assert done and done[0].outcome is Outcome.SUCCEEDED, done and done[0].reason
    assert list(seen) == ["early", "late"]  # each line once, in order
    assert seen["late"] - seen["early"] > 20, seen  # the first came about 40 s before the second
