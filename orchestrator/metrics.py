"""A stage's metrics file (read_metrics reads one JSON file) and its quality gate (check_gate: pure)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from orchestrator.spec import Gate


class MetricsError(ValueError):
    """The metrics file is missing, not JSON, or has no numbers; the stage fails with this reason."""


def read_metrics(outputs: Path, rel: str) -> dict[str, float]:
    """Flat {dotted.key: number} from outputs/rel (normalised by spec.py). A symlink anywhere on the way is
    refused, the file's own or a folder's: the stage planted it, and it could point at any host file."""
    path = outputs / rel
    if os.path.realpath(path) != os.path.join(os.path.realpath(outputs), rel) or not path.is_file():
        raise MetricsError(f"metrics file {rel} was not written to /outputs")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MetricsError(f"metrics file {rel} is not valid JSON: {e}") from e
    flat: dict[str, float] = {}
    _flatten(data, "", flat)
    if not flat:
        raise MetricsError(f"metrics file {rel} has no numbers")
    return flat


def _flatten(value: object, prefix: str, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(sub, f"{prefix}{key}.", out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix.rstrip(".")] = float(value)


def check_gate(gate: Gate, metrics: dict[str, float], last_pass: tuple[str, float] | None) -> str | None:
    """The reason the gate fails, or None when it passes. last_pass is (run id, value) of the gate's baseline
    (store.gate_baseline: the latest run that passed it, or a run accepted later); max_drop is measured from it."""
    if gate.metric not in metrics:
        return f"gate: metric {gate.metric} missing from the metrics file"
    value = metrics[gate.metric]
    if gate.min is not None and value < gate.min:
        return f"gate: {gate.metric} {value:.4g} below the minimum {gate.min:.4g}"
    if gate.max is not None and value > gate.max:
        return f"gate: {gate.metric} {value:.4g} above the maximum {gate.max:.4g}"
    if gate.max_drop is not None and last_pass is not None:
        run_id, previous = last_pass
        drop = previous - value
        if drop > gate.max_drop + 1e-12:
            return (
                f"gate: {gate.metric} {value:.4g} dropped {drop:.4g} from {previous:.4g} in run {run_id} "
                f"(max_drop {gate.max_drop:.4g}; `pipe gate accept RUN` takes a new baseline, --no-gate skips it once)"
            )
    return None
