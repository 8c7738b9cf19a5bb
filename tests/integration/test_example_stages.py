"""The example pipeline's stage images, run by hand through the Docker SDK, independently of the orchestrator.

Builds stages/<name> for each stage of the repository's pipeline.yaml and runs the chain with the mount layout
and sandbox of the stage contract (outputs, read-only inputs and workspace, params file, no network, read-only
root, non-root uid, no capabilities), taking commands, params, needs and inputs from pipeline.yaml itself.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.executor import LABEL_MANAGED, LABEL_PIPELINE

REPO = Path(__file__).resolve().parents[2]
STAGES = ("data", "train", "evaluate", "predict")
RUN_TIMEOUT_S = 300


def example_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    return spec


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def stage_images(docker_client: Any) -> dict[str, str]:
    """stage -> image id, built from stages/<stage>; the engine's layer cache makes a rebuild cheap."""
    spec = example_spec()
    images = {}
    for name in STAGES:
        context = REPO / spec["stages"][name]["build"]
        image, _ = docker_client.images.build(
            path=str(context),
            tag=f"pipe-example-{name}:dev",
            labels={LABEL_MANAGED: "1"},
            rm=True,
            forcerm=True,
        )
        images[name] = image.id
    return images


@pytest.fixture
def run_stage(
    docker: Any, stage_images: dict[str, str], tmp_path: Path
) -> Callable[..., tuple[int, str, Path]]:
    """Run one stage of the example like `pipe run` would: returns (exit code, logs, outputs folder)."""
    spec = example_spec()

    def run(name: str, inputs: dict[str, Path] | None = None) -> tuple[int, str, Path]:
        stage = spec["stages"][name]
        outputs = tmp_path / "runs" / name
        outputs.mkdir(parents=True)
        params = tmp_path / "params" / f"{name}.json"
        params.parent.mkdir(exist_ok=True)
        params.write_text(json.dumps(stage.get("params", {})))
        volumes = {str(outputs): {"bind": "/outputs", "mode": "rw"}}
        volumes[str(params)] = {"bind": "/pipe/params.json", "mode": "ro"}
        for up in stage.get("needs", []):
            volumes[str(tmp_path / "runs" / up)] = {"bind": f"/inputs/{up}", "mode": "ro"}
        for rel in stage.get("inputs", []):
            host = (inputs or {}).get(rel, REPO / rel)
            volumes[str(host)] = {"bind": f"/workspace/{rel}", "mode": "ro"}
        container = docker.containers.run(
            stage_images[name],
            command=stage["command"],
            detach=True,
            labels={LABEL_MANAGED: "1", LABEL_PIPELINE: str(tmp_path)},
            user=f"{os.getuid()}:{os.getgid()}",
            volumes=volumes,
            working_dir="/workspace",
            environment={"HOME": "/tmp"},
            read_only=True,
            tmpfs={"/tmp": "size=256m"},
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            nano_cpus=int(stage["resources"]["cpus"] * 1e9),
            mem_limit=stage["resources"]["memory"],
            memswap_limit=stage["resources"]["memory"],
        )
        try:
            exit_code = container.wait(timeout=RUN_TIMEOUT_S)["StatusCode"]
            logs = container.logs().decode()
        finally:
            container.remove(force=True)
        return exit_code, logs, outputs

    return run


def test_example_chain_trains_a_sane_model_and_predicts_every_new_row(run_stage: Any) -> None:
    raw_rows = len(csv_rows(REPO / "data/raw/diabetes.csv"))
    new_rows = csv_rows(REPO / "data/new/rows.csv")
    test_size = example_spec()["stages"]["data"]["params"]["test_size"]

    code, logs, data = run_stage("data")
    assert code == 0, logs
    n_test = len(csv_rows(data / "test.csv"))
    assert n_test == math.ceil(raw_rows * test_size)
    assert len(csv_rows(data / "train.csv")) == raw_rows - n_test

    code, logs, train = run_stage("train")
    assert code == 0, logs
    assert (train / "model.joblib").stat().st_size > 0
    card = json.loads((train / "model_card.json").read_text())
    assert card["train_rows"] == raw_rows - n_test
    assert card["params"]["model"] == "gradient_boosting"

    code, logs, evaluate = run_stage("evaluate")
    assert code == 0, logs
    metrics = json.loads((evaluate / "metrics.json").read_text())
    assert 0.2 < metrics["r2"] < 0.7, metrics
    assert metrics["n_test"] == n_test
    assert (evaluate / "pred_vs_actual.png").read_bytes().startswith(b"\x89PNG")

    code, logs, predict = run_stage("predict")
    assert code == 0, logs
    predictions = csv_rows(predict / "predictions.csv")
    assert len(predictions) == len(new_rows)
    assert all(math.isfinite(float(row["prediction"])) for row in predictions)


def test_data_stage_rejects_a_file_without_the_target_column(run_stage: Any, tmp_path: Path) -> None:
    bad = tmp_path / "diabetes.csv"
    lines = (REPO / "data/raw/diabetes.csv").read_text().splitlines()
    bad.write_text("\n".join(line.rpartition(",")[0] for line in lines) + "\n")

    code, logs, outputs = run_stage("data", inputs={"data/raw/diabetes.csv": bad})

    assert code == 1
    columns = "'age', 'sex', 'bmi', 'bp', 's1', 's2', 's3', 's4', 's5', 's6'"
    assert logs.strip().splitlines() == [
        f"data: /workspace/data/raw/diabetes.csv: columns are [{columns}], expected [{columns}, 'target']"
    ]
    assert list(outputs.iterdir()) == []
