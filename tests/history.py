"""Real history for the compare, metrics, plot, report and UI tests, made in-process with the fake engine of
tests/unit/test_api_run.py: a pipeline data -> train -> evaluate whose evaluate writes metrics from its params
and has a gate (r2 >= 0.5)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import api
from orchestrator.executor import ContainerSpec
from tests.unit.test_api_run import Events, FakeBackend

SPEC: dict[str, Any] = {
    "stages": {
        "data": {"image": "fake-data", "command": "true", "inputs": ["raw.csv"], "params": {"seed": 1}},
        "train": {"image": "fake-train", "command": "true", "needs": ["data"], "params": {"n_estimators": 100},
                  "resources": {"memory": "512m", "cpus": 1}},
        "evaluate": {"image": "fake-evaluate", "command": "true", "needs": ["train"], "params": {"quality": 0.8},
                     "metrics": "metrics.json", "gate": {"metric": "r2", "min": 0.5}},
    }
}


def params_of(spec: ContainerSpec) -> dict[str, Any]:
    mount = next(m for m in spec.mounts if m.target == "/pipe")
    return dict(json.loads((Path(mount.source) / "params.json").read_text()))


def evaluate(spec: ContainerSpec, outputs: Path) -> int:
    quality = params_of(spec)["quality"]
    (outputs / "metrics.json").write_text(json.dumps({"r2": quality, "rmse": round(1 - quality, 6)}))
    (outputs / "report.txt").write_text(f"quality {quality}\n")
    return 0


def train(spec: ContainerSpec, outputs: Path) -> int:
    (outputs / "model.bin").write_bytes(b"model " + json.dumps(params_of(spec)).encode())
    return 0


BEHAVIOURS = {"evaluate": evaluate, "train": train}


def run(path: Path, *params: str, behaviours: dict[str, Any] | None = None, **kwargs: Any) -> str:
    summary = api.run_pipeline(api.RunRequest(target=api.Target(path), params=params, **kwargs), Events(),
                               backend=FakeBackend({**BEHAVIOURS, **(behaviours or {})}))
    return summary.run_id


@dataclass(frozen=True)
class Made:
    path: Path
    first: str  # quality 0.8, passed its gate
    repeat: str  # all cached from `first`
    better: str  # quality 0.9, n_estimators 300
    gate_failed: str  # quality 0.3: evaluate fails its gate
    broken: str  # train exits 1: evaluate skipped


def make_history(make_pipeline: Any) -> Made:
    path = make_pipeline(SPEC, files={"raw.csv": "a,b\n1,2\n"})
    first = run(path)
    repeat = run(path)
    better = run(path, "evaluate.quality=0.9", "train.n_estimators=300")
    gate_failed = run(path, "evaluate.quality=0.3")
    broken = run(path, "train.n_estimators=7", behaviours={"train": lambda spec, out: 1})
    return Made(path, first, repeat, better, gate_failed, broken)
