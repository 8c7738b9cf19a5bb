"""api.run_pipeline, dry_run and status with a fake engine: cache hit, miss, restore, recording and the one
forecast, in milliseconds. The real engine's behaviour (caps, mounts, signals) is tested in tests/integration."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator import api
from orchestrator.events import Event, Notice, StagePlanned
from orchestrator.executor import ContainerSpec, ExecResult, Outcome, OutputSink
from orchestrator.hashing import HashMemo
from orchestrator.imageplan import ImageForecast
from orchestrator.plan import Selection
from orchestrator.results import RunStatus, StageStatus
from orchestrator.spec import Pipeline

Behaviour = Callable[[ContainerSpec, Path], int]  # writes into /outputs (the host path given); returns the exit


@dataclass
class FakeExecutor:
    behaviours: dict[str, Behaviour]
    calls: list[str] = field(default_factory=list)

    def run(self, spec: ContainerSpec, on_output: OutputSink) -> ExecResult:
        self.calls.append(spec.name)
        started = datetime.now(UTC)
        outputs = next(m.source for m in spec.mounts if m.target == "/outputs")
        code = self.behaviours.get(spec.name, write_ok)(spec, outputs)
        if spec.log_path is not None:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            spec.log_path.write_text(f"{spec.name} exit {code}\n")
        outcome = Outcome.SUCCEEDED if code == 0 else Outcome.FAILED
        return ExecResult(outcome, code, "" if code == 0 else f"exited with code {code}", started, datetime.now(UTC))

    def stop_all(self) -> None:
        pass


def write_ok(spec: ContainerSpec, outputs: Path) -> int:
    (outputs / "out.txt").write_text(f"{spec.name} {json.dumps(dict(spec.env), sort_keys=True)}\n")
    return 0


class FakeBackend:
    """Every stage uses an `image:` that 'exists' with a fixed id; nothing is built."""

    stores_outputs = False

    def __init__(self, behaviours: dict[str, Behaviour] | None = None) -> None:
        self.fake = FakeExecutor(behaviours or {})

    def executor(self) -> FakeExecutor:
        return self.fake

    def forecast_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                        hash_memo: HashMemo | None) -> dict[str, ImageForecast]:
        return {name: ImageForecast(f"sha256:{pipeline.stages[name].image}") for name in stages}

    def resolve_images(self, pipeline: Pipeline, stages: Iterable[str], memo_path: Path,
                       on_output: Callable[[str, str], None], hash_memo: HashMemo | None) -> dict[str, str]:
        return {name: f"sha256:{pipeline.stages[name].image}" for name in stages}

    def sweep(self, owner: str, is_alive: Callable[[str], bool | None]) -> list[str]:
        return []

    def capacity(self) -> tuple[float, int]:
        return 2.0, 1 << 33

    def gpu_problem(self) -> str | None:
        return None


class Events:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def planned(self) -> dict[str, tuple[bool, tuple[str, ...]]]:
        return {e.stage: (e.will_run, e.reasons) for e in self.events if isinstance(e, StagePlanned)}


SPEC: dict[str, Any] = {
    "stages": {
        "data": {"image": "fake-data", "command": "true", "inputs": ["raw.csv"], "params": {"seed": 1}},
        "train": {"image": "fake-train", "command": "true", "needs": ["data"]},
        "report": {"image": "fake-report", "command": "true", "needs": ["train"]},
    }
}


@pytest.fixture
def project(make_pipeline: Callable[..., Path]) -> Path:
    return make_pipeline(SPEC, files={"raw.csv": "a,b\n1,2\n"})


def run(path: Path, backend: FakeBackend, **kwargs: Any) -> tuple[Any, Events]:
    events = Events()
    summary = api.run_pipeline(api.RunRequest(target=api.Target(path), **kwargs), events, backend=backend)
    return summary, events


def reasons_everywhere(path: Path, **kwargs: Any) -> dict[str, dict[str, tuple[bool, tuple[str, ...]]]]:
    """What status, --dry-run and the run itself say about each stage (run last: it changes history)."""
    status = {d.stage: (d.run, d.reasons) for d in api.status(api.Target(path), FakeBackend()).next_run}
    forecast = api.dry_run(api.RunRequest(target=api.Target(path), **kwargs), backend=FakeBackend())
    dry = {d.stage: (d.run, d.reasons) for d in forecast.decisions}
    _, events = run(path, FakeBackend(), **kwargs)
    return {"status": status, "dry_run": dry, "run": events.planned()}


def test_a_second_run_restores_every_stage_and_starts_nothing(project: Path) -> None:
    first, _ = run(project, backend := FakeBackend())
    assert first.status is RunStatus.SUCCEEDED and backend.fake.calls == ["data", "train", "report"]
    second, _ = run(project, again := FakeBackend())
    assert again.fake.calls == []
    assert {n: r.status for n, r in second.results.items()} == dict.fromkeys(SPEC["stages"], StageStatus.CACHED)
    assert all(r.cached_from == first.run_id for r in second.results.values())
    restored = Path(second.results["train"].outputs_path or "") / "out.txt"
    assert restored.read_text().startswith("train ")


def test_status_dry_run_and_run_give_the_same_reasons(project: Path) -> None:
    fresh = reasons_everywhere(project)
    assert fresh["status"] == fresh["dry_run"]
    assert fresh["status"]["data"] == (True, ("never ran",))
    assert fresh["status"]["train"] == (True, ("upstream data runs first",))
    assert fresh["run"]["data"] == fresh["status"]["data"]  # downstream ones are decided once upstream is known

    cached = reasons_everywhere(project)
    assert cached["status"] == cached["dry_run"] == cached["run"]
    assert all(not runs for runs, _ in cached["status"].values())

    (project.parent / "raw.csv").write_text("a,b\n1,3\n")
    edited = reasons_everywhere(project)
    assert edited["status"] == edited["dry_run"]
    assert edited["status"]["data"][1][0].startswith("input raw.csv changed")
    assert edited["run"]["data"] == edited["status"]["data"]


def test_a_stage_that_never_succeeded_says_how_it_last_ended(project: Path) -> None:
    failing = FakeBackend({"train": lambda spec, out: 1})
    summary, _ = run(project, failing)
    assert summary.results["train"].status is StageStatus.FAILED
    everywhere = reasons_everywhere(project)
    assert everywhere["status"]["train"] == everywhere["dry_run"]["train"] == (True, ("last run failed (exit 1)",))
    assert everywhere["run"]["train"] == (True, ("last run failed (exit 1)",))


def test_a_stage_that_raises_inside_pipe_is_recorded_with_its_reason(project: Path) -> None:
    def boom(spec: ContainerSpec, out: Path) -> int:
        raise RuntimeError("disk on fire")

    summary, _ = run(project, FakeBackend({"train": boom}))
    assert summary.status is RunStatus.FAILED
    info = api.show_run(api.Target(project), summary.run_id)
    recorded = {s.stage: (s.status, s.reason) for s in info.stages}
    assert recorded["train"] == (StageStatus.FAILED, "internal error: RuntimeError('disk on fire')")
    assert recorded["report"][0] is StageStatus.SKIPPED
    assert all(s.status is not None for s in info.stages), "no stage may stay 'running' in a finished run"


def test_an_input_edited_while_its_stage_runs_is_not_cached(project: Path) -> None:
    raw = project.parent / "raw.csv"
    original = raw.read_text()

    def edits_its_input(spec: ContainerSpec, out: Path) -> int:
        raw.write_text("edited while running\n")  # as a user would, while the container runs
        return write_ok(spec, out)

    summary, events = run(project, FakeBackend({"data": edits_its_input}))
    data = summary.results["data"]
    assert data.status is StageStatus.SUCCEEDED
    assert data.warnings and "raw.csv changed while the stage ran" in data.warnings[0]
    assert any(isinstance(e, Notice) and "raw.csv changed while the stage ran" in e.message for e in events.events)
    raw.write_text(original)
    again, _ = run(project, backend := FakeBackend())
    assert "data" in backend.fake.calls, "the outputs of a stage whose input changed mid-run must not be a hit"
    assert again.results["data"].status is StageStatus.SUCCEEDED


def test_dry_run_writes_nothing(project: Path) -> None:
    run(project, FakeBackend())
    (project.parent / "raw.csv").write_text("changed\n")
    state = project.parent / "runs"
    before = snapshot(state)
    forecast = api.dry_run(api.RunRequest(target=api.Target(project)), backend=FakeBackend())
    assert forecast.would_run == ["data", "train", "report"]
    assert snapshot(state) == before


def test_status_of_a_never_run_pipeline_creates_nothing(project: Path) -> None:
    report = api.status(api.Target(project), FakeBackend())
    assert [d.run for d in report.next_run] == [True, True, True]
    assert not (project.parent / "runs").exists()


def test_selection_takes_upstream_outputs_from_the_latest_run(project: Path) -> None:
    run(project, FakeBackend())
    summary, _ = run(project, backend := FakeBackend(), selection=Selection(stage="report"), force=True)
    assert backend.fake.calls == ["report"] and summary.status is RunStatus.SUCCEEDED


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its size, mtime and mode: any write shows."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_mode)
            for p in sorted(root.rglob("*"))}


GATED: dict[str, Any] = {
    "stages": {
        "evaluate": {"image": "fake-eval", "command": "true", "inputs": ["raw.csv"], "metrics": "metrics.json",
                     "gate": {"metric": "r2", "min": 0.5, "max_drop": 0.02}},
    }
}


def scores(value: list[float]) -> Behaviour:
    def write(spec: ContainerSpec, out: Path) -> int:
        (out / "metrics.json").write_text(json.dumps({"r2": value[0]}))
        return 0
    return write


def test_a_max_drop_gate_can_take_a_new_baseline_or_be_skipped_once(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(GATED, files={"raw.csv": "old\n"})
    r2 = [0.79]
    assert run(path, FakeBackend({"evaluate": scores(r2)}))[0].status is RunStatus.SUCCEEDED
    (path.parent / "raw.csv").write_text("new\n")
    r2[0] = 0.87
    best, _ = run(path, FakeBackend({"evaluate": scores(r2)}))
    assert best.status is RunStatus.SUCCEEDED
    (path.parent / "raw.csv").write_text("old\n")  # back to the older data: a cache hit scoring 0.79
    locked, _ = run(path, FakeBackend())
    assert locked.results["evaluate"].status is StageStatus.FAILED
    assert "0.87" in locked.results["evaluate"].reason  # names what the drop is measured from

    skipped, _ = run(path, FakeBackend(), gate=False)
    assert skipped.status is RunStatus.SUCCEEDED
    assert skipped.results["evaluate"].warnings == ("evaluate: gate not checked (--no-gate)",)
    recorded = api.show_run(api.Target(path), skipped.run_id).stage("evaluate")
    assert recorded is not None and recorded.warnings == ("evaluate: gate not checked (--no-gate)",)
    assert recorded.gate_passed is None  # a skipped gate is no baseline
    assert run(path, FakeBackend())[0].status is RunStatus.FAILED  # only that once

    accepted = api.gate_accept(api.Target(path), skipped.run_id)
    assert [(a.stage, a.metric, a.value) for a in accepted] == [("evaluate", "r2", 0.79)]
    after, _ = run(path, FakeBackend())
    assert after.status is RunStatus.SUCCEEDED, after.results["evaluate"].reason


def test_gate_accept_refuses_a_stage_without_a_gate(make_pipeline: Callable[..., Path]) -> None:
    from orchestrator.errors import UsageError

    path = make_pipeline(GATED, files={"raw.csv": "x\n"})
    run(path, FakeBackend({"evaluate": scores([0.9])}))
    with pytest.raises(UsageError, match="did you mean 'evaluate'"):
        api.gate_accept(api.Target(path), "latest", stage="evaluat")


def test_a_run_records_its_commit_and_whether_the_tree_was_dirty(project: Path) -> None:
    import subprocess

    root = project.parent
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "pipeline.yaml", "raw.csv"], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    clean, _ = run(project, FakeBackend())
    info = api.show_run(api.Target(project), clean.run_id)
    assert info.git_commit and info.git_dirty is False
    (root / "raw.csv").write_text("edited, not committed\n")
    dirty, _ = run(project, FakeBackend())
    assert api.show_run(api.Target(project), dirty.run_id).git_dirty is True
    assert api.show_run(api.Target(project), dirty.run_id).to_json()["git_dirty"] is True
