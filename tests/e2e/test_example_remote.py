"""The example pipeline (pipeline.yaml at the repository's root) shared through the remote (issue 15): a second
machine, simulated by a second state dir and history database, gets every stage as a remote hit and starts no
container; `pipe status`, `pipe run --dry-run` and `pipe run` say "cached (remote)" alike."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import S3Bucket
from tests.e2e.helpers import containers_created, pipe, pipe_json
from tests.e2e.test_example import example  # noqa: F401  (the fixture)


def test_a_second_machine_gets_every_stage_of_the_example_from_the_remote(
    docker: Any, s3: S3Bucket, example: Path  # noqa: F811
) -> None:
    spec = yaml.safe_load(example.read_text())
    spec["remote"] = {"url": s3.url("team"), "endpoint": s3.endpoint}
    example.write_text(yaml.safe_dump(spec, sort_keys=False))
    a = ["--state-dir", str(example.parent / "machine-a")]
    done = pipe("run", example, *a, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "pushed 4 cache entries" in done.stdout
    first = pipe_json("show", "latest", example, *a)

    b = ["--state-dir", str(example.parent / "machine-b")]  # its own cache, runs and pipe.db
    assert pipe("validate", example, *b[:2]).returncode == 0  # resolves the images on this machine
    stages = ("data", "train", "evaluate", "predict")
    status = pipe_json("status", example, *b)
    assert status["run"] is None
    assert {n: (d["status"], d["remote"]) for n, d in status["next_run"].items()} == {
        n: ("cached", s3.url("team")) for n in stages}
    dry = pipe("run", example, "--dry-run", *b)
    assert [line.split(":")[1].strip() for line in dry.stdout.splitlines()] == ["cached (remote)"] * 4, dry.stdout

    since = time.time()
    second = pipe("run", example, *b)
    assert second.returncode == 0, second.stdout + second.stderr
    assert containers_created(docker, example.parent / "machine-b", since) == 0
    shown = pipe_json("show", "latest", example, *b)
    assert {s["stage"]: s["status"] for s in shown["stages"]} == dict.fromkeys(stages, "cached")
    assert all(s["reason"].startswith(f"cached (remote) from run {first['id']}, fetched ") for s in shown["stages"])
    by_stage = {s["stage"]: s for s in first["stages"]}
    for s in shown["stages"]:
        assert s["metrics"] == by_stage[s["stage"]]["metrics"]
        assert [(x["path"], x["digest"]) for x in s["artifacts"]] == \
            [(x["path"], x["digest"]) for x in by_stage[s["stage"]]["artifacts"]]
        for artifact in s["artifacts"]:  # the files on disk are the bytes the first machine made
            assert (Path(s["outputs_path"]) / artifact["path"]).stat().st_size == artifact["size"]
