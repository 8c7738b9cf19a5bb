"""DVC as the peer: installed from PyPI into its own virtualenv under the work folder, then the same 4-stage docker
pipeline driven by `dvc repro`/`dvc status` and by `pipe run`/`pipe status`, containers counted by the engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probes import BenchError, containers_started, run_command, run_pipe
from workloads import dvc_owner, name_out, peer_pipeline

DVC_ENV = {"DVC_NO_ANALYTICS": "1"}
SCENARIOS = ("cold", "no-op", "status", "one input edited")


def install_dvc(work: Path) -> tuple[Path, str]:
    """The dvc executable of work/dvc-venv (created with pip from PyPI when missing) and its version."""
    venv = work / "dvc-venv"
    dvc = venv / "bin" / "dvc"
    if not dvc.exists():
        shutil.rmtree(venv, ignore_errors=True)
        run_command([sys.executable, "-m", "venv", venv])
        run_command([venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", "dvc"])
    version = subprocess.run([dvc, "--version"], capture_output=True, text=True, env={**os.environ, **DVC_ENV},
                             check=False).stdout.strip()
    if not version:
        raise BenchError(f"{dvc} --version printed nothing; remove {venv} and rerun to reinstall")
    return dvc, version


@dataclass
class Side:
    """One tool's measurements: seconds and containers started, per scenario, one entry per repetition."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SCENARIOS})
    containers: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SCENARIOS})


def compare(client: Any, folder: Path, dvc: Path, repetitions: int) -> tuple[Side, Side]:
    """(pipe, DVC) over `repetitions` rounds of: cold run, no-op run, status, run after editing extra.txt.

    Each round starts both from nothing (pipe's runs/ and DVC's .dvc/, dvc.lock and outputs removed). The edit
    writes new content every round, so neither tool's run-cache can answer it from an earlier round."""
    pipe_side, dvc_side = Side(), Side()
    uid_gid = f"{os.getuid()}:{os.getgid()}"
    for rnd in range(max(1, repetitions)):
        peer_pipeline(folder, uid_gid)
        _reset_dvc(folder, dvc)
        for scenario in SCENARIOS:
            if scenario == "one input edited":
                (folder / "extra.txt").write_text(f"extra {rnd + 1} {time.time_ns()}\n")
            dvc_args = ["status"] if scenario == "status" else ["repro", "--quiet"]
            since = time.time()
            dvc_side.seconds[scenario].append(run_command([dvc, *dvc_args], cwd=folder, env=DVC_ENV))
            dvc_side.containers[scenario].append(containers_started(client, dvc_owner(folder), since))
            since = time.time()
            command = "status" if scenario == "status" else "run"
            pipe_side.seconds[scenario].append(run_pipe(command, folder / "pipeline.yaml").seconds)
            pipe_side.containers[scenario].append(containers_started(client, folder / "runs", since))
    return pipe_side, dvc_side


def _reset_dvc(folder: Path, dvc: Path) -> None:
    shutil.rmtree(folder / ".dvc", ignore_errors=True)
    for name in ("dvc.lock", ".dvcignore", *(name_out(s) for s in ("clean", "side", "train", "report"))):
        (folder / name).unlink(missing_ok=True)
    run_command([dvc, "init", "--no-scm", "--quiet"], cwd=folder, env=DVC_ENV)
    run_command([dvc, "config", "core.analytics", "false"], cwd=folder, env=DVC_ENV)


def compare_noop(client: Any, folder: Path, dvc: Path, repeat: int) -> tuple[Side, Side]:
    """(pipe, DVC) on one workload of workloads.peer_workload: both from nothing, one cold run each, then
    `repeat` rounds of no-op run and status, taken in turns (DVC, pipe, DVC, pipe). A no-op that starts a
    container is a BenchError."""
    pipe_side, dvc_side = Side(), Side()
    shutil.rmtree(folder / "runs", ignore_errors=True)
    _reset_dvc_outs(folder, dvc)
    dvc_side.seconds["cold"].append(run_command([dvc, "repro", "--quiet"], cwd=folder, env=DVC_ENV))
    pipe_side.seconds["cold"].append(run_pipe("run", "--jobs", "2", folder / "pipeline.yaml").seconds)
    for _ in range(max(1, repeat)):
        for scenario in ("no-op", "status"):
            dvc_args = ["status"] if scenario == "status" else ["repro", "--quiet"]
            since = time.time()
            dvc_side.seconds[scenario].append(run_command([dvc, *dvc_args], cwd=folder, env=DVC_ENV))
            dvc_side.containers[scenario].append(containers_started(client, dvc_owner(folder), since))
            since = time.time()
            pipe_side.seconds[scenario].append(run_pipe(scenario.replace("no-op", "run"),
                                                        folder / "pipeline.yaml").seconds)
            pipe_side.containers[scenario].append(containers_started(client, folder / "runs", since))
    for side, name in ((pipe_side, "pipe"), (dvc_side, "DVC")):
        if any(side.containers["no-op"]) or any(side.containers["status"]):
            raise BenchError(f"{name}'s no-op or status of {folder.name} started containers")
    return pipe_side, dvc_side


def _reset_dvc_outs(folder: Path, dvc: Path) -> None:
    from workloads import dvc_outs

    shutil.rmtree(folder / ".dvc", ignore_errors=True)
    for name in ("dvc.lock", ".dvcignore", *dvc_outs(folder)):
        (folder / name).unlink(missing_ok=True)
    run_command([dvc, "init", "--no-scm", "--quiet"], cwd=folder, env=DVC_ENV)
    run_command([dvc, "config", "core.analytics", "false"], cwd=folder, env=DVC_ENV)
