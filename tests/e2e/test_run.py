"""`pipe run` as a user runs it: real engine, real SQLite, real containers, exit codes and what is left behind."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import BUSYBOX, wait_for
from tests.e2e.helpers import containers_created, pipe, pipe_json, start_pipe

HANDOFF = {
    "stages": {
        "data": {
            "image": BUSYBOX,
            "command": "cat raw.txt > /outputs/clean.txt && echo data done",
            "inputs": ["raw.txt"],
        },
        "train": {
            "image": BUSYBOX,
            "command": "tr a-z A-Z < /inputs/data/clean.txt > /outputs/model.txt",
            "needs": ["data"],
            "params": {"epochs": 3},
        },
        "evaluate": {
            "image": BUSYBOX,
            "command": "wc -c < /inputs/train/model.txt > /outputs/score.txt; "
                       "echo '{\"size\": '$(cat /outputs/score.txt)'}' > /outputs/metrics.json",
            "needs": ["train"],
            "metrics": "metrics.json",
        },
    }
}


def statuses(path: Path) -> dict[str, str]:
    report = pipe_json("status", path)
    return {name: s["status"] for name, s in report["stages"].items()}


def test_handoff_from_data_to_train_to_evaluate(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "hello pipe\n"})
    done = pipe("run", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data | data done" in done.stdout
    report = pipe_json("status", path)
    outputs = {name: Path(s["outputs_path"]) for name, s in report["stages"].items()}
    assert (outputs["train"] / "model.txt").read_text() == "HELLO PIPE\n"
    assert (outputs["evaluate"] / "score.txt").read_text().strip() == "11"
    assert {s["stage"]: s["metrics"] for s in report["run"]["stages"]}["evaluate"] == {"size": 11.0}


def test_second_run_of_unchanged_pipeline_starts_no_container(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "hello\n"})
    assert pipe("run", path).returncode == 0
    since = time.time()
    done = pipe("run", path)
    assert done.returncode == 0, done.stderr
    assert statuses(path) == {"data": "cached", "train": "cached", "evaluate": "cached"}
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_editing_an_input_reruns_exactly_its_downstream(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    spec = json.loads(json.dumps(HANDOFF))
    spec["stages"]["side"] = {"image": BUSYBOX, "command": "echo side > /outputs/side.txt"}
    path = make_pipeline(spec, files={"raw.txt": "one\n"})
    assert pipe("run", path).returncode == 0
    (path.parent / "raw.txt").write_text("two\n")
    done = pipe("run", path)
    assert done.returncode == 0
    assert "data: runs: input raw.txt changed" in done.stdout
    assert statuses(path) == {"data": "succeeded", "train": "succeeded", "evaluate": "succeeded", "side": "cached"}


def test_touch_alone_keeps_everything_cached(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "same\n"})
    assert pipe("run", path).returncode == 0
    raw = path.parent / "raw.txt"
    raw.touch()
    assert pipe("run", path).returncode == 0
    assert set(statuses(path).values()) == {"cached"}


def test_upstream_rerun_with_identical_outputs_leaves_downstream_cached(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "same\n"})
    assert pipe("run", path).returncode == 0
    done = pipe("run", path, "--force-stage", "data")
    assert done.returncode == 0
    assert statuses(path) == {"data": "succeeded", "train": "cached", "evaluate": "cached"}


def test_param_change_reruns_the_stage_and_says_why(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "x\n"})
    assert pipe("run", path).returncode == 0
    done = pipe("run", path, "-p", "train.epochs=5")
    assert done.returncode == 0
    assert "train: runs: param epochs 3 -> 5" in done.stdout
    assert statuses(path)["data"] == "cached"


def test_dry_run_predicts_and_starts_nothing(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "x\n"})
    assert pipe("run", path).returncode == 0
    (path.parent / "raw.txt").write_text("y\n")
    since = time.time()
    done = pipe("run", path, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "data: runs: input raw.txt changed" in done.stdout
    assert "train: runs: upstream data runs first" in done.stdout
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_failure_skips_downstream_and_exits_1(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    spec = json.loads(json.dumps(HANDOFF))
    spec["stages"]["train"]["command"] = "echo about to fail; exit 3"
    path = make_pipeline(spec, files={"raw.txt": "x\n"})
    done = pipe("run", path)
    assert done.returncode == 1
    assert "train: failed: exited with code 3" in done.stdout
    assert statuses(path) == {"data": "succeeded", "train": "failed", "evaluate": "skipped"}
    # a failed stage is never cached: the next run runs it again
    assert "train: runs:" in pipe("run", path).stdout


def test_bad_file_exits_2_with_one_line_and_starts_nothing(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"data": {"image": BUSYBOX, "command": "true", "need": ["x"]}}})
    since = time.time()
    done = pipe("run", path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:")
    assert "stages.data.need: unknown key" in lines[0]
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_missing_image_is_an_error_before_any_container(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {
        "data": {"image": BUSYBOX, "command": "true"},
        "train": {"image": "pipe-test-no-such-image:1", "command": "true", "needs": ["data"]},
    }})
    since = time.time()
    done = pipe("run", path)
    assert done.returncode == 2
    assert "pipe-test-no-such-image:1" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_single_stage_needs_earlier_upstream_outputs(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "abc\n"})
    done = pipe("run", path, "--stage", "train")
    assert done.returncode == 2
    assert "needs the outputs of data from an earlier run" in done.stderr
    assert pipe("run", path, "--stage", "data").returncode == 0
    done = pipe("run", path, "--stage", "train", "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    assert statuses(path) == {"train": "succeeded"}


def test_sigint_mid_stage_cancels_cleanly(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {
        "slow": {"image": BUSYBOX, "command": "echo started; echo partial > /outputs/part.txt; sleep 60"},
        "after": {"image": BUSYBOX, "command": "true", "needs": ["slow"]},
    }})
    proc = start_pipe("run", path)
    assert proc.stdout is not None
    wait_for(lambda: "slow | started" in (proc.stdout.readline() or ""), timeout=60, what="the stage to start")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    report = pipe_json("status", path)
    assert report["run"]["status"] == "cancelled"
    assert report["stages"]["slow"]["status"] == "cancelled"
    assert report["stages"]["after"]["status"] == "skipped"
    assert not list((path.parent / "runs" / "cache").rglob("*.json")), "a cancelled stage is never cached"
    assert not (path.parent / "runs" / report["run"]["id"] / "slow").exists(), "partial outputs are discarded"


def test_sigkilled_run_is_cleaned_up_by_the_next_command(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    from tests.conftest import pipe_containers

    path = make_pipeline({"stages": {"slow": {"image": BUSYBOX, "command": "echo started; sleep 120"}}})
    proc = start_pipe("run", path)
    assert proc.stdout is not None
    wait_for(lambda: "slow | started" in (proc.stdout.readline() or ""), timeout=60, what="the stage to start")
    proc.kill()
    proc.wait(timeout=30)
    assert pipe_containers(docker, str(path.parent)), "a SIGKILL leaves the container behind by necessity"
    report = pipe_json("status", path)
    assert report["run"]["status"] == "interrupted"
    path.write_text(path.read_text().replace("sleep 120", "true"))
    done = pipe("run", path)  # the next run sweeps the orphan first
    assert done.returncode == 0, done.stdout + done.stderr
    assert not pipe_containers(docker, str(path.parent))


def test_second_concurrent_run_is_refused_naming_the_running_one(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {"slow": {"image": BUSYBOX, "command": "echo started; sleep 30"}}})
    proc = start_pipe("run", path)
    assert proc.stdout is not None
    wait_for(lambda: "slow | started" in (proc.stdout.readline() or ""), timeout=60, what="the stage to start")
    done = pipe("run", path)
    assert done.returncode == 3
    assert "another pipe run of this pipeline is running (run " in done.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
