"""The commands that run nothing: validate, schema; and how `pipe run` talks to a terminal and to a log."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.conftest import BUSYBOX
from tests.e2e.helpers import containers_created, pipe

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(rb"\x1b\[")


def test_validate_accepts_a_good_file_and_checks_its_images(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"a": {"image": BUSYBOX, "command": "true"}}})
    since = time.time()
    done = pipe("validate", path)
    assert done.returncode == 0, done.stderr
    assert "ok (1 stage)" in done.stdout
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_validate_rejects_a_missing_image_in_one_line(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"a": {"image": "pipe-test-absent:0", "command": "true"}}})
    done = pipe("validate", path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "pipe-test-absent:0" in done.stderr


def test_validate_rejects_a_cycle_naming_it(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {
        "data": {"image": BUSYBOX, "command": "true", "needs": ["train"]},
        "train": {"image": BUSYBOX, "command": "true", "needs": ["data"]},
    }})
    done = pipe("validate", path, "--no-images")
    assert done.returncode == 2
    assert "cycle: data -> train -> data" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_schema_is_json_schema_that_accepts_the_example() -> None:
    done = pipe("schema")
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    example = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    jsonschema.validate(example, schema)
    bad = {**example, "stages": {"data": {**example["stages"]["data"], "need": ["x"]}}}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema accepted an unknown key")


def test_run_off_a_terminal_prints_plain_timestamped_lines(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"a": {"image": BUSYBOX, "command": "echo hello"}}})
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path)], capture_output=True, check=False)
    assert done.returncode == 0
    assert not ANSI.search(done.stdout + done.stderr), "no control codes under cron or CI"
    assert re.search(rb"^\d\d:\d\d:\d\d a \| hello$", done.stdout, re.MULTILINE)


def test_run_on_a_terminal_shows_a_live_view(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"a": {"image": BUSYBOX, "command": "echo hello"}}})
    code, screen = terminal_screen("run", path, columns=120)
    assert code == 0
    assert ANSI.search(screen), "a terminal gets the rich live view"
    assert b"succeeded" in screen


def test_version() -> None:
    from orchestrator import __version__

    done = pipe("--version")
    assert done.returncode == 0 and done.stdout == f"pipe {__version__}\n"


def test_validate_json_lists_every_error_with_file_line_and_key(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline("stages:\n  data:\n    image: busybox\n    network: 'yes'\n  train:\n    image: busybox\n"
                         "    need: [data]\n")
    done = pipe("validate", path, "--no-images", "--json")
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout) == {"ok": False, "errors": [
        {"file": str(path), "line": 4, "key": "stages.data.network", "exit_code": 2,
         "message": "expected true or false, got the string 'yes'"},
        {"file": str(path), "line": 7, "key": "stages.train.need", "exit_code": 2,
         "message": "unknown key (did you mean 'needs'?)"},
    ]}
    plain = pipe("validate", path, "--no-images")  # without --json: the first, on one line
    assert plain.returncode == 2 and plain.stderr == f"error: {path}:4: stages.data.network: expected true or false, " \
                                                     "got the string 'yes'\n"


def test_validate_json_on_success_and_on_a_missing_file(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"a": {"image": BUSYBOX}, "b": {"image": BUSYBOX, "needs": ["a"]}}})
    done = pipe("validate", path, "--no-images", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": True, "file": str(path), "pipeline": "project", "stages": 2,
                                       "stage_names": ["a", "b"], "schedule": False, "errors": []}
    missing = pipe("validate", path.parent / "nope.yaml", "--no-images", "--json")
    assert missing.returncode == 2
    (error,) = json.loads(missing.stdout)["errors"]
    assert error["file"] is None and error["line"] is None and "no such file" in error["message"]


def test_dag_json_gives_nodes_in_run_order_and_edges(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {
        "train": {"image": BUSYBOX, "needs": ["data"]}, "data": {"image": BUSYBOX},
        "evaluate": {"image": BUSYBOX, "needs": ["train", "data"]},
    }})
    done = pipe("dag", path, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "nodes": [{"name": "data", "needs": []}, {"name": "train", "needs": ["data"]},
                  {"name": "evaluate", "needs": ["data", "train"]}],
        "edges": [{"from": "data", "to": "evaluate"}, {"from": "data", "to": "train"},
                  {"from": "train", "to": "evaluate"}],
    }


def test_a_typo_in_p_is_refused_before_anything_runs(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"train": {"image": "pipe-test-absent:0", "params": {"n_estimators": 100}}}})
    done = pipe("run", path, "-p", "train.n_estimatorz=3")
    assert done.returncode == 2
    assert done.stderr == ("error: param override train.n_estimatorz: stage train has no param 'n_estimatorz': "
                           "did you mean 'n_estimators'? (to add a new param, write -p +train.n_estimatorz=...)\n")
    assert not (path.parent / "runs").exists()  # refused before the engine or the state folder


def test_validate_says_up_front_that_the_engine_has_no_gpus(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    if "nvidia" in (docker.info().get("Runtimes") or {}):
        raise AssertionError("this test needs an engine without the nvidia runtime")
    path = make_pipeline("stages:\n  train:\n    image: " + BUSYBOX + "\n    resources: {gpus: 1}\n")
    since = time.time()
    for command in (("validate",), ("run",)):
        done = pipe(*command, path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: {path}:4: stages.train.resources.gpus: asks for 1 GPU but the engine "
                                      "has no GPU runtime (runtimes: ")
        assert len(done.stderr.splitlines()) == 1
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_the_state_folder_keeps_itself_out_of_git(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"schedule": {"cron": "@daily"}, "stages": {"a": {"image": BUSYBOX}}})
    assert pipe("schedule", path).returncode == 0
    assert not (path.parent / "runs").exists(), "a read command creates no state folder"
    done = pipe("cache", "gc", path, "--keep-runs", "1")  # a writing command creates it
    assert done.returncode == 0, done.stderr
    assert (path.parent / "runs" / ".gitignore").read_text().splitlines()[-1] == "*"


def terminal_screen(*args: str | Path, timeout: float = 120, columns: int = 200) -> tuple[int, bytes]:
    """`pipe ARGS` on a pseudo-terminal: its exit code and the bytes the screen received."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *map(str, args)], stdin=follower, stdout=follower, stderr=follower,
        env={**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"},
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=30), screen


def run_on_a_terminal(*args: str | Path, timeout: float = 120) -> tuple[int, str]:
    """`pipe ARGS` on a pseudo-terminal: its exit code and what the screen received, control codes removed."""
    code, screen = terminal_screen(*args, timeout=timeout)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))


FAILING = {"image": BUSYBOX, "command": "for i in $(seq 1 30); do echo line $i; done; echo '[[gpu]] [bold]x[/]'; exit 1"}


def test_a_failing_stage_on_a_terminal_shows_its_last_lines_under_one_table(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {"train": FAILING}})
    code, screen = run_on_a_terminal("run", path)
    assert code == 1, screen
    run_id = json.loads(pipe("status", path, "--json").stdout)["run"]["id"]
    after = screen[screen.rindex("train failed: exited with code 1"):]
    assert "line 30" in after and "line 12" in after and "line 11\r" not in after, after
    assert "[[gpu]] [bold]x[/]" in after, "stage output is not read as markup"
    assert f"full log: pipe logs {run_id} train" in after
    assert "reason" not in screen, "the summary is the live view's last frame, not a second table"


def test_a_failing_stage_off_a_terminal_names_its_log_command(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {"train": FAILING}})
    done = pipe("run", path)
    assert done.returncode == 1
    run_id = json.loads(pipe("status", path, "--json").stdout)["run"]["id"]
    assert re.search(rf"^\d\d:\d\d:\d\d train: full log: pipe logs {run_id} train$", done.stdout, re.MULTILINE)
    assert "train | [[gpu]] [bold]x[/]" in done.stdout


def test_validate_says_when_it_builds(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"a": {"build": "stages/a", "command": "true"}}},
                         files={"stages/a/Dockerfile": f"FROM {BUSYBOX}\nRUN echo {time.time_ns()}\n"})
    try:
        done = pipe("validate", path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{path}: ok (1 stage)"
        lines = [line.split(" ", 1)[1] for line in done.stderr.splitlines()]
        assert lines[0] == "a: building image from stages/a" and len(lines) == 2, done.stderr
        assert re.fullmatch(r"a: image built in \S+", lines[1]), lines
        code, screen = run_on_a_terminal("validate", path, "--state-dir", path.parent / "fresh")  # an empty memo
        assert code == 0, screen
        assert "building a: " in screen and "a: image built in" in screen
        assert "Step 1/" not in screen, "a build that succeeds shows no raw output"
    finally:
        for image in docker.images.list(name="pipe/project-a"):
            docker.images.remove(image.id, force=True)


def test_logs_of_a_cached_stage_points_to_the_run_it_came_from(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {"train": {"image": BUSYBOX, "command": "echo trained"}}})
    assert pipe("run", path).returncode == 0
    first = json.loads(pipe("status", path, "--json").stdout)["run"]["id"]
    assert pipe("run", path).returncode == 0
    second = json.loads(pipe("status", path, "--json").stdout)["run"]["id"]
    done = pipe("logs", "latest", "train", path)
    assert done.returncode == 2
    assert f"stage train of run {second} was cached: its outputs were restored from run {first}" in done.stderr
    assert f"`pipe logs {second} train --origin`" in done.stderr
    origin = pipe("logs", "latest", "train", path, "--origin")
    assert origin.returncode == 0, origin.stderr
    assert origin.stdout == "trained\n"
    assert f"restored from run {first}" in origin.stderr
    typo = pipe("logs", "latest", "trian", path)
    assert typo.returncode == 2 and "(did you mean 'train'?)" in typo.stderr, typo.stderr


def test_logs_of_an_oom_killed_stage_that_printed_nothing_says_so(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {"hog": {"image": BUSYBOX, "resources": {"memory": "16m"},
                                             "command": "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}"}}})
    assert pipe("run", path).returncode == 1
    done = pipe("logs", "latest", "hog", path)
    assert done.returncode == 0 and done.stdout == ""
    assert "printed nothing; it was killed: out of memory (cap 16 MiB), before it wrote anything" in done.stderr
