"""Two runs side by side (`pipe compare`, the web UI's compare page): params, metrics, stages that re-ran and why,
image, input and output digests, durations. Pure: reads two recorded runs, explains with cachekey.explain_miss.

Params are the ones the stages ran with, read from each stage's recorded cache ingredients (so a value from the
file and one from `-p` look the same), flattened as `stage.key.sub`. Metrics are `stage.name`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from orchestrator.cachekey import Ingredients, explain_miss
from orchestrator.hashing import canonical_json
from orchestrator.results import StageStatus
from orchestrator.store.records import RunInfo, StageRunInfo

_RAN = (StageStatus.SUCCEEDED, StageStatus.FAILED, StageStatus.CANCELLED)


@dataclass(frozen=True)
class Change:
    """One named value that differs: `a` and `b` are None where that run has no such value."""

    name: str
    a: Any
    b: Any

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class MetricChange:
    name: str
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def relative(self) -> float | None:
        """(b - a) / |a|; None when a is 0 or either is missing."""
        return None if self.delta is None or not self.a else self.delta / abs(self.a)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "a": self.a, "b": self.b, "delta": self.delta, "relative": self.relative}


@dataclass(frozen=True)
class StageDiff:
    """One stage in both runs. `reran`: B executed it (it was not restored from the cache); `reasons` says why,
    ingredient by ingredient against A's record (or B's own reason when there is nothing to compare)."""

    stage: str
    status_a: str | None  # None: the stage is not in that run
    status_b: str | None
    reran: bool
    reasons: tuple[str, ...]
    image_a: str | None
    image_b: str | None
    inputs: tuple[Change, ...]  # declared inputs whose digest differs
    outputs_a: str | None
    outputs_b: str | None
    duration_a: float | None
    duration_b: float | None

    @property
    def outputs_differ(self) -> bool:
        return self.outputs_a != self.outputs_b

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "status_a": self.status_a, "status_b": self.status_b, "reran": self.reran,
            "reasons": list(self.reasons), "image_a": self.image_a, "image_b": self.image_b,
            "image_changed": self.image_a != self.image_b, "inputs": [c.to_json() for c in self.inputs],
            "outputs_a": self.outputs_a, "outputs_b": self.outputs_b, "outputs_changed": self.outputs_differ,
            "duration_a_s": self.duration_a, "duration_b_s": self.duration_b,
        }


@dataclass(frozen=True)
class Comparison:
    a: RunInfo
    b: RunInfo
    params: tuple[Change, ...]  # only those that differ
    metrics: tuple[MetricChange, ...]  # every metric either run recorded
    stages: tuple[StageDiff, ...]  # every stage either run has, in B's order then A's

    def to_json(self) -> dict[str, Any]:
        def run(info: RunInfo) -> dict[str, Any]:
            return {key: value for key, value in info.to_json().items() if key != "stages"}

        return {"a": run(self.a), "b": run(self.b), "params": [c.to_json() for c in self.params],
                "metrics": [m.to_json() for m in self.metrics], "stages": [s.to_json() for s in self.stages]}


def compare(a: RunInfo, b: RunInfo) -> Comparison:
    params_a, params_b = run_params(a), run_params(b)
    params = tuple(Change(name, params_a.get(name), params_b.get(name)) for name in sorted(params_a.keys()
                   | params_b.keys()) if _canon(params_a.get(name, _MISSING)) != _canon(params_b.get(name, _MISSING)))
    metrics_a, metrics_b = run_metrics(a), run_metrics(b)
    metrics = tuple(MetricChange(name, metrics_a.get(name), metrics_b.get(name))
                    for name in sorted(metrics_a.keys() | metrics_b.keys()))
    names = [s.stage for s in b.stages] + [s.stage for s in a.stages if b.stage(s.stage) is None]
    return Comparison(a, b, params, metrics, tuple(_stage_diff(name, a.stage(name), b.stage(name)) for name in names))


def run_params(run: RunInfo) -> dict[str, Any]:
    """{stage.key.sub: value} of every stage's params as it ran (its recorded cache ingredients)."""
    flat: dict[str, Any] = {}
    for stage in run.stages:
        ingredients = _ingredients(stage)
        if ingredients is not None:
            _flatten(ingredients.params, f"{stage.stage}.", flat)
    return flat


def run_metrics(run: RunInfo) -> dict[str, float]:
    return {f"{s.stage}.{name}": value for s in run.stages for name, value in s.metrics.items()}


def _stage_diff(name: str, a: StageRunInfo | None, b: StageRunInfo | None) -> StageDiff:
    reran = b is not None and b.status in _RAN
    ing_a, ing_b = _ingredients(a), _ingredients(b)
    if b is None:
        reasons: tuple[str, ...] = ("not in run B",)
    elif a is None:
        reasons = ("not in run A",)
    elif ing_a is not None and ing_b is not None:
        reasons = tuple(explain_miss(ing_a, ing_b))
        if reran and not reasons:
            reasons = (f"same ingredients as run A; re-ran: {b.reason}" if b.reason else "same ingredients as run A",)
    else:
        reasons = (b.reason,) if b.reason else ()
    inputs: tuple[Change, ...] = ()
    if ing_a is not None and ing_b is not None:
        inputs = tuple(Change(path, ing_a.inputs.get(path), ing_b.inputs.get(path))
                       for path in sorted(ing_a.inputs.keys() | ing_b.inputs.keys())
                       if ing_a.inputs.get(path) != ing_b.inputs.get(path))
    return StageDiff(
        stage=name, status_a=_status(a), status_b=_status(b), reran=reran, reasons=reasons,
        image_a=a.image_id if a else None, image_b=b.image_id if b else None, inputs=inputs,
        outputs_a=a.outputs_digest if a else None, outputs_b=b.outputs_digest if b else None,
        duration_a=a.duration_s if a else None, duration_b=b.duration_s if b else None)


def _status(stage: StageRunInfo | None) -> str | None:
    if stage is None:
        return None
    return stage.status.value if stage.status is not None else "running"


def _ingredients(stage: StageRunInfo | None) -> Ingredients | None:
    if stage is None or not stage.ingredients_json:
        return None
    try:
        return Ingredients.from_json(stage.ingredients_json)
    except ValueError:
        return None


_MISSING = object()


def _canon(value: object) -> str:
    """Params are the same exactly when their canonical JSON is (10 and 10.0 differ, as in the cache key)."""
    return "\0missing" if value is _MISSING else canonical_json(value)


def _flatten(params: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in params.items():
        if isinstance(value, dict) and value:
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value


def show_value(value: Any) -> str:
    """A param as the compare table shows it: JSON, so "10" and 10 and 10.0 read differently."""
    return "-" if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)
