"""The repository's own pipeline.yaml, end to end through `pipe run`: real images built from stages/, real
scikit-learn, real metrics, the gate, param overrides and the cache."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import containers_created, pipe, pipe_json

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of the example (pipeline.yaml, stages/, data/) whose state lives under tmp_path."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "pipeline.yaml", project / "pipeline.yaml")
    for folder in ("stages", "data"):
        shutil.copytree(REPO / folder, project / folder)
    return project / "pipeline.yaml"


def stage_statuses(path: Path) -> dict[str, str]:
    return {name: s["status"] for name, s in pipe_json("status", path)["stages"].items()}


def test_example_pipeline_end_to_end(docker: Any, example: Path) -> None:
    done = pipe("run", example, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    report = pipe_json("status", example)
    outputs = {name: Path(s["outputs_path"]) for name, s in report["stages"].items()}
    metrics = {s["stage"]: s["metrics"] for s in report["run"]["stages"]}["evaluate"]
    assert 0.3 < metrics["r2"] < 0.7, metrics  # gradient boosting on the diabetes data: about 0.47
    assert 30 < metrics["mae"] < 70
    assert (outputs["train"] / "model.joblib").stat().st_size > 1000
    assert (outputs["evaluate"] / "pred_vs_actual.png").read_bytes()[:4] == b"\x89PNG"
    predictions = (outputs["predict"] / "predictions.csv").read_text().strip().splitlines()
    new_rows = (example.parent / "data" / "new" / "rows.csv").read_text().strip().splitlines()
    assert len(predictions) == len(new_rows)

    # a second run rebuilds nothing and reruns nothing
    since = time.time()
    again = pipe("run", example)
    assert again.returncode == 0, again.stderr
    assert "building image" not in again.stdout, "an unchanged build context is not sent to the engine"
    assert set(stage_statuses(example).values()) == {"cached"}
    assert containers_created(docker, example.parent / "runs", since) == 0

    # a param override re-runs train and everything below it, not data
    override = pipe("run", example, "-p", "train.n_estimators=300")
    assert override.returncode == 0, override.stdout[-3000:]
    assert "train: runs: param n_estimators 200 -> 300" in override.stdout
    assert stage_statuses(example) == {
        "data": "cached", "train": "succeeded", "evaluate": "succeeded", "predict": "succeeded",
    }
    shown = pipe_json("show", "latest", example)
    assert shown["params_override"] == {"train.n_estimators": 300}

    # a worse model fails the gate on evaluate, and predict never ships it
    worse = pipe("run", example, "-p", "train.n_estimators=5")
    assert worse.returncode == 1
    assert "evaluate: failed: gate: r2" in worse.stdout
    statuses = stage_statuses(example)
    assert statuses["evaluate"] == "failed" and statuses["predict"] == "skipped"

    metrics_history = pipe_json("metrics", example, "--all")
    assert len(metrics_history) >= 3
