"""Which libraries a command imports on its path: a contract, not a timing (issue 20).

Each command runs as a user runs it (`python -m orchestrator`, a fresh interpreter) and reports the top-level
modules in sys.modules as it leaves. `pipe status` and a local dry run read the engine's images over its socket
(engine_socket.py) and order stages without networkx (plan.py), so neither the Docker SDK nor networkx may enter,
and both read a SQLite history without SQLAlchemy;
`pipe --help` opens no history either; a no-op `pipe run` (every image there, every stage cached, no container
left to sweep) needs neither, and a run that starts a container loads the SDK. A run writes a SQLite history
that is already at the current schema without SQLAlchemy (store/sqlite_writer.py); the first run, which creates
it, goes through Store. Nothing loads what
only another executor, the remote or plots need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import BUSYBOX

# runs `python -m orchestrator ARGS` and writes the top-level modules loaded to IMPORTS_FILE as it exits
_LAUNCHER = """
import json, os, runpy, sys
def _report():
    with open(os.environ['IMPORTS_FILE'], 'w') as f:
        json.dump(sorted({m.split('.')[0] for m in sys.modules}), f)
_exit = os._exit
def _exit_reporting(code):
    _report()
    _exit(code)
os._exit = _exit_reporting
sys.argv[0] = 'pipe'
runpy.run_module('orchestrator', run_name='__main__', alter_sys=True)
"""
ELSEWHERE = {"kubernetes", "boto3", "botocore", "matplotlib", "croniter"}  # other executors, the remote, plots
SDK = {"docker", "requests", "urllib3"}
PIPELINE = {"name": "budget", "stages": {
    "data": {"image": BUSYBOX, "command": "cat raw.txt > /outputs/data.txt", "inputs": ["raw.txt"]},
    "train": {"image": BUSYBOX, "command": "cp /inputs/data/data.txt /outputs/model.txt", "needs": ["data"]},
}}


def imports_of(tmp_path: Path, *args: str | Path) -> set[str]:
    out = tmp_path / "imports.json"
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, "IMPORTS_FILE": str(out)})
    assert done.returncode == 0, done.stdout + done.stderr
    return set(json.loads(out.read_text()))


def test_help_opens_no_history_engine_or_graph_library(tmp_path: Path) -> None:
    loaded = imports_of(tmp_path, "--help")
    assert loaded & ({"sqlalchemy", "networkx", "blake3"} | SDK | ELSEWHERE) == set()


def test_status_and_a_dry_run_load_neither_the_docker_sdk_nor_networkx_nor_sqlalchemy(
        docker: Any, make_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    path = make_pipeline(PIPELINE, {"raw.txt": "x\n"})
    assert subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path)], capture_output=True,
                          check=False, timeout=300).returncode == 0  # a history to read
    for args in (("status", path), ("run", "--dry-run", path)):
        loaded = imports_of(tmp_path, *args)
        assert "yaml" in loaded  # the probe sees what the command loads
        assert loaded & ({"networkx", "sqlalchemy"} | SDK | ELSEWHERE) == set(), args


def test_a_no_op_run_loads_neither_the_sdk_nor_networkx_nor_sqlalchemy_and_a_run_that_starts_a_container(
        docker: Any, make_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    path = make_pipeline(PIPELINE, {"raw.txt": "x\n"})
    first = imports_of(tmp_path, "run", path)
    assert {"docker", "sqlalchemy"} <= first  # the probe sees the SDK when a stage runs; Store made the history
    loaded = imports_of(tmp_path, "run", path)
    assert loaded & ({"networkx", "sqlalchemy"} | SDK | ELSEWHERE) == set()
    (path.parent / "raw.txt").write_text("y\n")
    edited = imports_of(tmp_path, "run", path)
    assert "docker" in edited and "sqlalchemy" not in edited
