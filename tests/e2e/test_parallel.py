"""Parallel stages, the failure policy and retries, with real containers: what `pipe run` really ran, and when.

Times come from inside the containers (/proc/uptime: the host kernel's clock, 10 ms resolution, shared by all
containers). Where two stages must be seen running together, they wait on a gate file the test creates only once
both have started, so no assertion depends on how fast the engine is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from tests.conftest import BUSYBOX, wait_for
from tests.e2e.helpers import pipe, pipe_json

# Stamp the start, wait for the gate (at most `limit` tenths of a second), stamp the end.
GATED = (
    "read s _ < /proc/uptime; touch /outputs/started; echo {name} started; "
    "i=0; while [ ! -e /workspace/gate/go ] && [ $i -lt {limit} ]; do sleep 0.1; i=$((i+1)); done; "
    "read e _ < /proc/uptime; echo $s $e > /outputs/span"
)


def gated(name: str, limit: int = 600, **extra: Any) -> dict[str, Any]:
    return {"image": BUSYBOX, "command": GATED.format(name=name, limit=limit), "inputs": ["gate"], **extra}


def span(path: Path, stage: str) -> tuple[float, float]:
    outputs = Path(pipe_json("status", path)["stages"][stage]["outputs_path"])
    start, end = (outputs / "span").read_text().split()
    return float(start), float(end)


def started(path: Path, stage: str) -> bool:
    return any((path.parent / "runs").glob(f"*/{stage}/started"))


class Watched:
    """A `pipe` subprocess whose output lines a thread collects, so that waiting on them never blocks."""

    def __init__(self, *args: str | Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *map(str, args)], text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, what: str, timeout: float = 120) -> None:
        def seen() -> bool:
            if any(text in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                if not any(text in line for line in self.lines):
                    raise AssertionError(f"pipe ended before {what}:\n{self.output}")
            return False

        wait_for(seen, timeout=timeout, what=what)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # a failed test must not leave pipe (and its containers) running
            self.proc.kill()
            self.proc.wait(timeout=30)


def stage_rows(path: Path) -> dict[str, dict[str, Any]]:
    return {s["stage"]: s for s in pipe_json("show", "latest", path)["stages"]}


def test_independent_stages_overlap_with_two_jobs(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"one": gated("one"), "two": gated("two")}}, files={"gate/.keep": ""})
    with Watched("run", path, "--jobs", "2") as run:
        # both running at once is the claim; the gate only opens once both have started
        wait_for(lambda: started(path, "one") and started(path, "two"), timeout=120, what="both stages to start")
        (path.parent / "gate" / "go").touch()
        assert run.wait() == 0, run.output
    (s1, e1), (s2, e2) = span(path, "one"), span(path, "two")
    assert s1 < e2 and s2 < e1, f"intervals do not intersect: one {s1}-{e1}, two {s2}-{e2}"


def test_one_job_runs_independent_stages_one_after_the_other(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    # no gate: each stage waits one second, long enough that two running together would overlap
    path = make_pipeline({"stages": {"one": gated("one", limit=10), "two": gated("two", limit=10)}},
                         files={"gate/.keep": ""})
    done = pipe("run", path, "--jobs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    (s1, e1), (s2, e2) = span(path, "one"), span(path, "two")
    assert e1 <= s2 or e2 <= s1, f"intervals intersect: one {s1}-{e1}, two {s2}-{e2}"


FAILING = {
    "stages": {
        "bad": {"image": BUSYBOX, "inputs": ["gate"], "command": "touch /outputs/started; "
                "while [ ! -e /workspace/gate/fail ]; do sleep 0.1; done; exit 3"},
        "bad-child": {"image": BUSYBOX, "command": "touch /outputs/ran", "needs": ["bad"]},
        "long": gated("long"),
        "long-child": {"image": BUSYBOX, "command": "touch /outputs/ran", "needs": ["long"]},
        "zlater": {"image": BUSYBOX, "command": "touch /outputs/ran"},
    }
}


def test_failure_stops_new_stages_and_lets_running_ones_finish(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(FAILING, files={"gate/.keep": ""})
    gate = path.parent / "gate"
    # order: bad, long, zlater, ...: with two jobs, bad and long start and zlater waits for a slot
    with Watched("run", path, "--jobs", "2") as run:
        wait_for(lambda: started(path, "bad") and started(path, "long"), timeout=120, what="bad and long to start")
        (gate / "fail").touch()
        run.wait_for_line("bad: failed: exited with code 3", "bad to fail")
        (gate / "go").touch()  # long is still running: now it may finish
        assert run.wait() == 1, run.output
    rows = stage_rows(path)
    assert {name: row["status"] for name, row in rows.items()} == {
        "bad": "failed", "long": "succeeded", "bad-child": "skipped", "long-child": "skipped", "zlater": "skipped",
    }
    assert rows["zlater"]["reason"] == "skipped: run stopped after bad failed"
    assert not started(path, "zlater") and not any((path.parent / "runs").glob("*/zlater/ran"))
    assert pipe_json("show", "latest", path)["status"] == "failed"


def test_keep_going_runs_everything_not_downstream_of_the_failure(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(FAILING, files={"gate/go": "", "gate/fail": ""})  # gates open: no waiting
    done = pipe("run", path, "--jobs", "2", "--keep-going")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = stage_rows(path)
    assert {name: row["status"] for name, row in rows.items()} == {
        "bad": "failed", "long": "succeeded", "bad-child": "skipped", "long-child": "succeeded",
        "zlater": "succeeded",
    }
    assert rows["bad-child"]["reason"] == "skipped: upstream bad failed"
    assert (Path(rows["zlater"]["outputs_path"]) / "ran").exists()


def test_retries_are_counted_in_history(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"flaky": {
        "image": BUSYBOX, "command": "echo attempt $(cat /proc/sys/kernel/random/uuid); exit 5",
        "retries": 2, "retry_delay": "100ms",
    }}})
    done = pipe("run", path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "flaky: attempt 1 failed (exited with code 5); retrying in 0.1s" in done.stdout
    assert "flaky: attempt 2 failed (exited with code 5); retrying in 0.2s" in done.stdout
    row = stage_rows(path)["flaky"]
    assert (row["status"], row["attempts"], row["reason"]) == ("failed", 3, "exited with code 5 (after 3 attempts)")
    attempts = [line for line in Path(row["log_path"]).read_text().splitlines() if line.startswith("attempt ")]
    assert len(set(attempts)) == 3, f"three distinct attempts ran: {attempts}"


OOM = {"image": BUSYBOX, "resources": {"memory": "16m"},
       "command": "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}"}


def test_out_of_memory_is_not_retried_by_default(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"hog": {**OOM, "retries": 1, "retry_delay": "100ms"}}})
    done = pipe("run", path)
    assert done.returncode == 1, done.stdout + done.stderr
    row = stage_rows(path)["hog"]
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["reason"].startswith("killed: out of memory"), row["reason"]


def test_out_of_memory_is_retried_when_asked(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"hog": {**OOM, "retries": 1, "retry_delay": "100ms", "retry_on": ["oom"]}}})
    done = pipe("run", path)
    assert done.returncode == 1, done.stdout + done.stderr
    row = stage_rows(path)["hog"]
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["reason"].startswith("killed: out of memory"), row["reason"]
