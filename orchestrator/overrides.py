"""`-p` overrides of stage params for one run: parsed, checked against the pipeline, applied. Pure.

    -p train.n_estimators=300    replaces a param the file declares (nested keys by dots: train.model.depth=3)
    -p +train.warm_start=true    adds a param the file does not declare (as Hydra spells it)

A value is read by the file's own rules (yamlfile.read_value), so `10.0` is a float and `10` an int either way
and the cache key sees the same value for the same spelling. An unknown stage or param is an error with a
"did you mean"; NaN and infinities are refused, as in the file (JSON, /pipe/params.json, cannot hold them).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.spec import Pipeline, non_finite_at
from orchestrator.yamlfile import read_value

ADD = "+"
_FORM = "use STAGE.KEY=VALUE (e.g. train.n_estimators=300), or +STAGE.KEY=VALUE to add a param"


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`("train.n_estimators=300", "+train.new=1")` -> {"train.n_estimators": 300, "+train.new": 1}.

    The keys keep their `+` (history records the overrides as written); a later item for a key wins.
    UsageError for a malformed item, a value that is not YAML, or a value holding NaN or an infinity.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        dotted, sep, raw = item.partition("=")
        dotted = dotted.strip()
        stage, dot, key = dotted.removeprefix(ADD).partition(".")
        if not sep or not dot or not stage or not key or "" in key.split("."):
            raise UsageError(f"bad param override {item!r}: {_FORM}")
        try:
            value = read_value(raw)
        except ValueError as e:
            raise UsageError(f"param override {dotted}: {e} (quote the value to pass a string)") from None
        if (where := non_finite_at(value)) is not None:
            inner = f" at {where}" if where else ""
            raise UsageError(f"param override {dotted}: {raw.strip()!r}{inner} is not a finite number; JSON "
                             "(/pipe/params.json) cannot hold NaN or infinity: quote it to pass a string")
        parsed[dotted] = value
    return parsed


def apply_overrides(pipeline: Pipeline, overrides: Mapping[str, Any]) -> Pipeline:
    """The pipeline with params overridden for one run; UsageError for an unknown stage or param (with a hint),
    a `+` param that already exists, or a key below a param that is not a mapping."""
    if not overrides:
        return pipeline
    params = {name: copy.deepcopy(stage.params) for name, stage in pipeline.stages.items()}
    touched: set[str] = set()
    for dotted, value in overrides.items():
        add = dotted.startswith(ADD)
        name, _, key = dotted.removeprefix(ADD).partition(".")
        if name not in pipeline.stages:
            raise UsageError(f"param override {dotted}: unknown stage {name!r}: {_hint(name, pipeline.stages)}")
        _set(params[name], key.split("."), value, add, dotted)
        touched.add(name)
    stages = {name: stage.model_copy(update={"params": params[name]}) if name in touched else stage
              for name, stage in pipeline.stages.items()}
    return pipeline.model_copy(update={"stages": stages}).with_source(pipeline.source)


def _set(params: dict[str, Any], parts: list[str], value: Any, add: bool, dotted: str) -> None:
    node = params
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if part not in node:
            if not add:
                stage = dotted.partition(".")[0]
                raise UsageError(f"param override {dotted}: stage {stage} has no param {where!r}: "
                                 f"{_hint(part, node)} (to add a new param, write -p {ADD}{dotted}=...)")
            if last:
                node[part] = value
                return
            node[part] = {}
        elif last:
            if add:
                raise UsageError(f"param override {dotted}: param {where!r} already exists; drop the "
                                 f"{ADD} to replace it")
            node[part] = value
            return
        child = node[part]
        if not isinstance(child, dict):
            raise UsageError(f"param override {dotted}: param {where!r} is not a mapping, so it has no "
                             f"{parts[depth + 1]!r}")
        node = child


def _hint(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(list(known)[:12]) + (", ..." if len(known) > 12 else "")
    return f"there are {shown}" if known else "there are none here"
