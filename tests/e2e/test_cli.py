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
    assert "ok (1 stages)" in done.stdout
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
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(path)], stdin=follower, stdout=follower, stderr=follower,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm-256color"},
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 120
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
    assert proc.wait(timeout=30) == 0
    assert ANSI.search(screen), "a terminal gets the rich live view"
    assert b"succeeded" in screen
