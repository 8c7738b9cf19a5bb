"""One forecast, told the truth, with a real engine: status, --dry-run and the run agree; a dry run changes
nothing on disk or in the engine; an input edited while its stage runs never poisons the cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import BUSYBOX, pipe_containers, wait_for
from tests.e2e.helpers import pipe, pipe_json, start_pipe

DOCKERFILE = f"FROM {BUSYBOX}\nCOPY train.sh /app/train.sh\n"
BUILT: dict[str, Any] = {
    "stages": {
        "data": {"image": BUSYBOX, "command": "cat /workspace/raw.txt > /outputs/data.txt", "inputs": ["raw.txt"]},
        "train": {"build": "stages/train", "command": "sh /app/train.sh", "needs": ["data"]},
    }
}
FILES = {"raw.txt": "x\n", "stages/train/Dockerfile": DOCKERFILE,
         "stages/train/train.sh": "cp /inputs/data/data.txt /outputs/model.txt\n"}


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def engine_images(docker: Any) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((i.id, tuple(sorted(i.tags))) for i in docker.images.list(all=True))


def next_run(path: Path) -> dict[str, Any]:
    return {name: (s["runs"], s["reasons"]) for name, s in pipe_json("status", path)["next_run"].items()}


def dry_run(path: Path) -> dict[str, Any]:
    done = pipe("run", path, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dry_run"] is True and report["status"] in ("would_run", "cached")
    return {name: (s["runs"], s["reasons"]) for name, s in report["stages"].items()}


def test_an_edited_build_context_is_forecast_alike_and_the_dry_run_builds_nothing(
        docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(BUILT, files=FILES)
    state = path.parent / "runs"
    assert pipe("run", path).returncode == 0
    (path.parent / "stages/train/train.sh").write_text("cp /inputs/data/data.txt /outputs/model.txt; echo v2\n")
    before_tree, before_images = tree(state), engine_images(docker)

    forecast = dry_run(path)
    expected = (True, ["image would be rebuilt (context changed: stages/train/train.sh)"])
    assert forecast["train"] == expected
    assert forecast["data"][0] is False
    assert next_run(path) == forecast  # status says the same
    assert tree(state) == before_tree, "a dry run and status write nothing in the state folder"
    assert engine_images(docker) == before_images, "a dry run builds and tags nothing"

    done = pipe("run", path)
    assert done.returncode == 0, done.stderr
    assert "train: runs: image rebuilt" in done.stdout or "image rebuilt" in done.stdout


def test_a_failed_stage_is_forecast_as_failed_not_as_never_run(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    spec = json.loads(json.dumps(BUILT))
    spec["stages"]["train"]["command"] = "exit 1"
    path = make_pipeline(spec, files=FILES)
    assert pipe("run", path).returncode == 1
    assert next_run(path)["train"] == (True, ["last run failed (exit 1)"])
    assert dry_run(path)["train"] == (True, ["last run failed (exit 1)"])


def test_a_dry_run_of_a_never_run_pipeline_creates_nothing(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(BUILT, files=FILES)
    before_images = engine_images(docker)
    forecast = dry_run(path)
    assert forecast["train"] == (True, ["upstream data runs first"])
    assert forecast["data"] == (True, ["never ran"])
    assert not (path.parent / "runs").exists()
    assert engine_images(docker) == before_images


def test_an_input_edited_while_its_stage_runs_is_not_cached(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    spec = {"stages": {"copy": {"image": BUSYBOX, "inputs": ["in.txt"],
                                "command": "echo started; sleep 3; cat /workspace/in.txt > /outputs/o"}}}
    path = make_pipeline(spec, files={"in.txt": "AAAA"})
    proc = start_pipe("run", path)
    assert proc.stdout is not None
    wait_for(lambda: pipe_containers(docker, str(path.parent)), timeout=60, what="the stage's container")
    (path.parent / "in.txt").write_text("BBBB")  # in place, while the container runs
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "in.txt changed while the stage ran" in out
    shown = pipe_json("show", "latest", path)
    assert "in.txt changed while the stage ran" in json.dumps(shown)  # in history too
    (path.parent / "in.txt").write_text("AAAA")
    again = pipe("run", path)
    assert again.returncode == 0, again.stderr
    latest = pipe_json("show", "latest", path)
    copy = next(s for s in latest["stages"] if s["stage"] == "copy")
    assert copy["status"] == "succeeded", "the edited run's outputs must not be restored for AAAA"
    assert (Path(copy["outputs_path"]) / "o").read_text() == "AAAA"
