"""The repository's own pipeline.yaml, end to end through `pipe run`: real images built from stages/, real
scikit-learn, real metrics, the gate, param overrides and the cache."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.serve_docker import LABEL_SERVE_OWNER
from tests.e2e.helpers import containers_created, pipe, pipe_json
from tests.e2e.test_serve import free_port

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


ROW = {"age": 79, "sex": 2, "bmi": 23.3, "bp": 88, "s1": 186, "s2": 128.4, "s3": 33, "s4": 6, "s5": 4.81,
       "s6": 102}


def call(port: int, path: str, body: object | None = None) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_example_trains_gates_promotes_serves_and_a_retrain_swaps_under_load(docker: Any, example: Path) -> None:
    """scripts/example.sh's flow (run, serve up, POST /predict, serve down) on the real example, and a retrain
    that passes its gate swapping the served model while requests keep coming, none failing."""
    port = free_port()
    example.write_text(example.read_text().replace("publish: 127.0.0.1:8080", f"publish: 127.0.0.1:{port}"))
    try:
        done = pipe("run", example, timeout=1500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr
        first = pipe_json("runs", example)[0]["id"]
        up = pipe("serve", "up", example, "--json", timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        answer = call(port, "/predict", [ROW])
        assert answer["run_id"] == first and len(answer["predictions"]) == 1
        assert 25 < answer["predictions"][0] < 350  # diabetes progression a year on: the data's range
        meta = call(port, "/metadata")
        assert meta["run_id"] == first and meta["host"] and 0.3 < meta["metrics"]["evaluate"]["r2"] < 0.7

        failures: list[str] = []
        answered: list[str] = []
        stop = threading.Event()

        def requests() -> None:
            while not stop.is_set() and len(answered) < 100_000:
                try:
                    answered.append(call(port, "/predict", {"rows": [ROW]})["run_id"])
                except (urllib.error.URLError, OSError, ValueError) as e:
                    failures.append(repr(e))

        loop = threading.Thread(target=requests, daemon=True)
        loop.start()
        retrain = pipe("run", example, "-p", "train.n_estimators=300", timeout=1500)  # promote: auto swaps
        swapped_at = len(answered)
        time.sleep(1)
        stop.set()
        loop.join(timeout=60)
        assert retrain.returncode == 0, retrain.stdout[-3000:] + retrain.stderr
        second = pipe_json("runs", example)[0]["id"]
        assert failures == [] and answered[0] == first and second != first
        assert set(answered[swapped_at:]) == {second} and call(port, "/metadata")["run_id"] == second
    finally:
        down = pipe("serve", "down", example)
    assert down.returncode == 0, down.stderr
    owner = str(example.parent / "runs")
    assert docker.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={owner}"}) == []
