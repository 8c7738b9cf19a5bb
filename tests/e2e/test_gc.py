"""`pipe gc` as a user meets it (issue 14 #16): old run folders pruned with the cache entries and pipe-built images
no kept run uses, the freed bytes that `du` agrees with, pruned runs named as such by show/logs, disk use shown."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import BUSYBOX
from tests.e2e.helpers import pipe, pipe_json
from tests.e2e.test_cache import built_images, run_ok  # noqa: F401  (built_images is a fixture)

SPEC = {"stages": {
    "data": {"image": BUSYBOX, "command": "head -c 300000 /dev/urandom > /outputs/big.bin"},
    "train": {"image": BUSYBOX, "needs": ["data"], "params": {"epochs": 1},
              "command": "! grep -q fail /pipe/params.json && cat /inputs/data/big.bin /pipe/params.json "
                         "> /outputs/model.bin"},
}}


def du(*paths: Path) -> int:
    """`du` itself, one invocation: a hard-linked file counts once."""
    out = subprocess.run(["du", "-s", "-B1", "-c", *map(str, paths)], capture_output=True, text=True, check=True)
    return int(out.stdout.splitlines()[-1].split()[0])


def test_gc_prunes_old_runs_and_reports_what_du_sees(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(SPEC)
    state = path.parent / "runs"
    run_ok(path)
    run_ok(path, "-p", "train.epochs=2")
    run_ok(path, "-p", "train.epochs=3")
    assert pipe("run", path, "-p", "+train.fail=1").returncode == 1
    runs = [r["id"] for r in pipe_json("runs", path)]  # newest first: failed, epochs 3, 2, 1
    folders = [state / run_id for run_id in runs]
    assert all(f.is_dir() for f in folders)

    cache_only = pipe_json("cache", "gc", path, "--keep-runs", "1", "--dry-run")
    assert cache_only["entries_removed"] == 2 and cache_only["bytes_still_linked"] >= 2 * 300_000, \
        "the old runs' folders still link the blobs: removing entries alone frees almost nothing"
    assert cache_only["bytes_freed"] < 300_000

    before = du(state / "cache", *folders)
    dry = pipe_json("gc", path, "--keep-runs", "1", "--dry-run")
    assert all(f.is_dir() for f in folders), "a dry run removes nothing"
    done = pipe_json("gc", path, "--keep-runs", "1")
    assert done["runs_removed"] == dry["runs_removed"] == runs[2:]
    assert set(done["runs_kept"]) == set(runs[:2]), "the newest run, and the latest that succeeded"
    assert done["cache"]["entries_removed"] == 2
    assert done["bytes_freed"] == dry["bytes_freed"] == before - du(state / "cache", *folders[:2])
    assert done["bytes_freed"] >= 2 * 300_000
    assert [f.is_dir() for f in folders] == [True, True, False, False]

    shown = pipe("show", runs[3], path)
    assert shown.returncode == 0, shown.stderr
    assert f"run {runs[3]}: outputs pruned by gc on " in shown.stdout
    assert pipe_json("show", runs[3], path)["outputs_pruned_at"].endswith("Z")
    assert pipe_json("show", runs[0], path)["outputs_pruned_at"] is None
    logs = pipe("logs", runs[3], "train", path)
    assert logs.returncode == 2
    assert f"error: run {runs[3]}: outputs pruned by gc on " in logs.stderr

    disk = pipe_json("status", path)["disk"]
    assert disk["cache_bytes"] > 300_000 and disk["run_folders"] == 2
    assert disk["total_bytes"] == disk["cache_bytes"] + disk["runs_bytes"]
    for command in (("status",), ("cache", "ls")):
        text = pipe(*command, path)
        assert text.returncode == 0, text.stderr
        assert "disk: cache " in text.stdout and "2 run folder(s)" in text.stdout

    run_ok(path, "-p", "train.epochs=3")  # the kept entries still hit
    assert {s["stage"]: s["status"] for s in pipe_json("show", "latest", path)["stages"]} == \
        {"data": "cached", "train": "cached"}


def test_gc_removes_pipe_built_images_no_kept_run_uses_but_not_one_a_container_uses(
    docker: Any, make_pipeline: Callable[..., Path], built_images: list[str]  # noqa: F811
) -> None:
    spec = {"name": f"gc-{uuid.uuid4().hex[:8]}", "stages": {
        "built": {"build": "stages/built", "command": "cat /version.txt > /outputs/version.txt"},
        "plain": {"image": BUSYBOX, "command": "echo plain > /outputs/plain.txt"},
    }}
    dockerfile = "FROM pipe-busybox:latest\nRUN echo one > /version.txt\n"
    path = make_pipeline(spec, files={"stages/built/Dockerfile": dockerfile})
    ids = []
    for version in ("one", "two", "three"):
        (path.parent / "stages/built/Dockerfile").write_text(dockerfile.replace("one", version))
        run_ok(path)
        ids.append(next(s["image_id"] for s in pipe_json("show", "latest", path)["stages"] if s["stage"] == "built"))
    built_images.extend(ids)
    assert len(set(ids)) == 3
    holder = docker.containers.create(ids[0], command=["true"], labels={"dev.pipe.test": str(path)})
    try:
        dry = pipe_json("gc", path, "--keep-runs", "1", "--dry-run")
        assert (dry["images_removed"], dry["images_held"]) == ([ids[1]], [ids[0]])
        assert docker.images.get(ids[1])
        done = pipe_json("gc", path, "--keep-runs", "1")
        assert (done["images_removed"], done["images_held"]) == ([ids[1]], [ids[0]])
        assert done["image_bytes_freed"] >= 0
    finally:
        holder.remove(force=True)
    remaining = {image.id for image in docker.images.list(all=True)}
    assert ids[1] not in remaining and {ids[0], ids[2]} <= remaining
    assert docker.images.get(BUSYBOX), "an `image:` stage's image is never pipe's to remove"
    memo = json.loads((path.parent / "runs" / "images.json").read_text())["images"]
    assert set(memo.values()) == {ids[0], ids[2]}
    run_ok(path)
    assert {s["stage"]: s["status"] for s in pipe_json("show", "latest", path)["stages"]} == \
        {"built": "cached", "plain": "cached"}
