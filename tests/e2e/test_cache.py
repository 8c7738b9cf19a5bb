"""The stage cache as a user meets it (issue 3): what invalidates, damaged entries, `cache: false`, no-copy
restores, `pipe cache ls | verify | gc`, `--force`, and miss reasons kept in history. Real engine, real SQLite."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from docker.errors import APIError

from tests.conftest import BUSYBOX
from tests.e2e.helpers import containers_created, pipe, pipe_json
from tests.e2e.test_run import HANDOFF, statuses


def latest(path: Path) -> dict[str, Any]:
    """`pipe show latest --json`, stages by name."""
    run: dict[str, Any] = pipe_json("show", "latest", path)
    run["by_stage"] = {s["stage"]: s for s in run["stages"]}
    return run


def blob_of(path: Path, digest: str) -> Path:
    """Where the cache keeps a (non-executable) file of this content digest."""
    return path.parent / "runs" / "cache" / "blobs" / digest[:2] / digest


def artifact(path: Path, stage: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(a for a in latest(path)["by_stage"][stage]["artifacts"] if a["path"] == name)
    return found


def run_ok(*args: str | Path) -> str:
    done = pipe("run", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture
def built_images(docker: Any) -> Iterator[list[str]]:
    """Image ids a test built; removed afterwards so the engine keeps no test images."""
    ids: list[str] = []
    yield ids
    for image_id in dict.fromkeys(ids):
        with suppress(APIError):  # already gone: nothing of ours is left
            docker.images.remove(image_id, force=True)


def test_rebuilt_image_with_changed_dockerfile_invalidates_its_stage(
    docker: Any, make_pipeline: Callable[..., Path], built_images: list[str]
) -> None:
    spec = {
        "name": f"rebuild-{uuid.uuid4().hex[:8]}",  # the build's tag is named after the pipeline
        "stages": {
            "built": {"build": "stages/built", "command": "cat /version.txt > /outputs/version.txt"},
            "plain": {"image": BUSYBOX, "command": "echo plain > /outputs/plain.txt"},
        },
    }
    dockerfile = "FROM pipe-busybox:latest\nRUN echo one > /version.txt\n"
    path = make_pipeline(spec, files={"stages/built/Dockerfile": dockerfile})
    run_ok(path)
    first = latest(path)["by_stage"]["built"]["image_id"]
    built_images.append(first)

    (path.parent / "stages/built/Dockerfile").write_text(dockerfile.replace("echo one", "echo two"))
    since = time.time()
    out = run_ok(path)
    second = latest(path)["by_stage"]["built"]["image_id"]
    built_images.append(second)
    assert second != first
    assert "built: runs: image rebuilt" in out
    assert statuses(path) == {"built": "succeeded", "plain": "cached"}
    assert containers_created(docker, path.parent / "runs", since) == 1
    report = pipe_json("status", path)
    assert (Path(report["stages"]["built"]["outputs_path"]) / "version.txt").read_text() == "two\n"
    assert latest(path)["by_stage"]["built"]["reason"].startswith("ran: image rebuilt")


def test_param_edit_in_the_file_invalidates_and_history_keeps_the_reason(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "x\n"})
    run_ok(path)
    assert latest(path)["by_stage"]["data"]["reason"] == "ran: never ran"
    path.write_text(path.read_text().replace("epochs: 3", "epochs: 4"))
    since = time.time()
    run_ok(path)
    stages = latest(path)["by_stage"]
    assert stages["train"]["status"] == "succeeded"
    assert stages["train"]["reason"] == "ran: param epochs 3 -> 4"
    assert stages["data"]["status"] == "cached" and stages["evaluate"]["status"] == "cached"
    assert containers_created(docker, path.parent / "runs", since) == 1


def test_input_edit_reason_in_history_names_input_and_upstream(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "one\n"})
    run_ok(path)
    (path.parent / "raw.txt").write_text("three\n")
    run_ok(path)
    stages = latest(path)["by_stage"]
    assert stages["data"]["reason"].startswith("ran: input raw.txt changed (")
    assert stages["train"]["reason"] == "ran: upstream data outputs changed"
    assert stages["evaluate"]["reason"] == "ran: upstream train outputs changed"


def test_deleted_blob_is_a_warning_and_the_stage_reruns(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "hello\n"})
    run_ok(path)
    key = latest(path)["by_stage"]["train"]["cache_key"]
    blob = blob_of(path, artifact(path, "train", "model.txt")["digest"])
    assert blob.is_file()
    blob.unlink()

    since = time.time()
    out = run_ok(path)
    assert f"cache entry {key[:12]} is damaged (blob of model.txt is missing); re-running" in out
    assert statuses(path) == {"data": "cached", "train": "succeeded", "evaluate": "cached"}
    assert containers_created(docker, path.parent / "runs", since) == 1
    assert blob.is_file(), "the re-run stores the blob again"
    run_ok(path)
    assert set(statuses(path).values()) == {"cached"}


def test_truncated_blob_is_a_warning_and_the_stage_reruns(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "a longer line of raw data\n"})
    run_ok(path)
    key = latest(path)["by_stage"]["data"]["cache_key"]
    found = artifact(path, "data", "clean.txt")
    blob = blob_of(path, found["digest"])
    with open(blob, "r+b") as f:  # the blob is 0444, but the tests run as its owner or root
        f.truncate(5)

    out = run_ok(path)
    assert f"cache entry {key[:12]} is damaged (blob of clean.txt has 5 bytes, not {found['size']})" in out
    assert statuses(path) == {"data": "succeeded", "train": "cached", "evaluate": "cached"}
    assert blob.stat().st_size == found["size"]
    assert (Path(latest(path)["by_stage"]["train"]["outputs_path"]) / "model.txt").read_text() == \
        "A LONGER LINE OF RAW DATA\n"


def test_uncached_stage_always_runs_but_identical_outputs_keep_downstream_cached(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {
        "fetch": {"image": BUSYBOX, "command": "cat /pipe/params.json > /outputs/data.txt", "cache": False,
                  "params": {"version": 1}},
        "use": {"image": BUSYBOX, "command": "cat /inputs/fetch/data.txt > /outputs/copy.txt", "needs": ["fetch"]},
    }})
    run_ok(path)
    assert not [m for m in pipe_json("cache", "ls", path) if m["stage"] == "fetch"], "cache: false is never stored"
    since = time.time()
    out = run_ok(path)
    assert "fetch: runs: cache: false" in out
    assert statuses(path) == {"fetch": "succeeded", "use": "cached"}
    assert containers_created(docker, path.parent / "runs", since) == 1
    # fresh data that did change re-runs what uses it
    run_ok(path, "-p", "fetch.version=2")
    assert statuses(path) == {"fetch": "succeeded", "use": "succeeded"}
    assert latest(path)["by_stage"]["use"]["reason"] == "ran: upstream fetch outputs changed"


def test_restored_outputs_are_hard_links_to_the_blobs(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "link me\n"})
    run_ok(path)
    first = latest(path)
    run_ok(path)
    second = latest(path)
    assert second["id"] != first["id"]
    for name, stage in second["by_stage"].items():
        assert stage["status"] == "cached"
        assert stage["outputs_path"] != first["by_stage"][name]["outputs_path"]
        assert stage["artifacts"], name
        for a in stage["artifacts"]:
            restored = (Path(stage["outputs_path"]) / a["path"]).stat()
            blob = blob_of(path, a["digest"]).stat()
            assert (restored.st_dev, restored.st_ino) == (blob.st_dev, blob.st_ino), f"{name}/{a['path']} is a copy"
            assert restored.st_mode & 0o222 == 0, "blobs, and so restored files, are read-only"


def test_cache_ls_lists_every_entry(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "list\n"})
    run_ok(path)
    run = latest(path)
    entries = pipe_json("cache", "ls", path)
    assert {e["stage"]: e["key"] for e in entries} == {n: s["cache_key"] for n, s in run["by_stage"].items()}
    for e in entries:
        stage = run["by_stage"][e["stage"]]
        assert e["run_id"] == run["id"]
        assert e["digest"] == stage["outputs_digest"]
        assert e["files"] == len(stage["artifacts"])
        assert e["size"] == sum(a["size"] for a in stage["artifacts"])
    text = pipe("cache", "ls", path)
    assert text.returncode == 0, text.stderr
    for e in entries:
        assert any(e["key"][:12] in line and e["stage"] in line for line in text.stdout.splitlines()), e


def test_cache_verify_finds_a_corrupt_blob_of_the_same_size(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "hello\n"})
    run_ok(path)
    clean = pipe("cache", "verify", path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problem(s)" in clean.stdout
    key = latest(path)["by_stage"]["train"]["cache_key"]
    found = artifact(path, "train", "model.txt")
    blob = blob_of(path, found["digest"])
    assert blob.read_bytes() == b"HELLO\n"
    blob.write_bytes(b"JELLO\n")
    damaged = pipe("cache", "verify", path)
    assert damaged.returncode == 1
    assert f"blob {found['digest'][:12]} is corrupt" in damaged.stderr
    assert f"cache entry {key[:12]} is damaged (blob of model.txt is missing or corrupt)" in damaged.stderr
    assert "2 problem(s)" in damaged.stdout


def test_cache_gc_keeps_what_the_latest_run_uses(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    spec = json.loads(json.dumps(HANDOFF))
    spec["stages"]["train"]["command"] = "(tr a-z A-Z < /inputs/data/clean.txt; cat /pipe/params.json) > /outputs/model.txt"
    path = make_pipeline(spec, files={"raw.txt": "gc\n"})
    run_ok(path)
    old = latest(path)["by_stage"]
    path.write_text(path.read_text().replace("epochs: 3", "epochs: 4"))
    run_ok(path)
    new = latest(path)["by_stage"]
    assert [new[n]["status"] for n in ("data", "train", "evaluate")] == ["cached", "succeeded", "succeeded"]
    stale = {old["train"]["cache_key"], old["evaluate"]["cache_key"]}
    kept = {s["cache_key"] for s in new.values()}
    assert len(pipe_json("cache", "ls", path)) == 5

    dry = pipe("cache", "gc", path, "--keep-runs", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 2 entries" in dry.stdout and "kept 3" in dry.stdout
    assert len(pipe_json("cache", "ls", path)) == 5, "a dry run removes nothing"

    done = pipe("cache", "gc", path, "--keep-runs", "1")
    assert done.returncode == 0, done.stderr
    assert "removed 2 entries" in done.stdout
    assert {e["key"] for e in pipe_json("cache", "ls", path)} == kept
    assert not stale & kept
    for stage in new.values():
        for a in stage["artifacts"]:
            assert blob_of(path, a["digest"]).is_file(), f"blob of kept {stage['stage']}/{a['path']} removed"
    old_model = next(a for a in old["train"]["artifacts"] if a["path"] == "model.txt")
    assert not blob_of(path, old_model["digest"]).exists(), "the blob only a removed entry used is gone"

    since = time.time()
    run_ok(path)
    assert set(statuses(path).values()) == {"cached"}
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_force_reruns_every_stage_and_force_stage_only_that_one(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "force\n"})
    run_ok(path)
    since = time.time()
    out = run_ok(path, "--force")
    assert containers_created(docker, path.parent / "runs", since) == 3
    for name, stage in latest(path)["by_stage"].items():
        assert stage["status"] == "succeeded", name
        assert stage["reason"] == "ran: forced", name
        assert f"{name}: runs: forced" in out

    since = time.time()
    run_ok(path, "--force-stage", "train")
    assert containers_created(docker, path.parent / "runs", since) == 1
    assert statuses(path) == {"data": "cached", "train": "succeeded", "evaluate": "cached"}
