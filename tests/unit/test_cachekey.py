"""The key recipe's number rule: one canonical form (canonical JSON) gives both the key and the explanation."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from orchestrator.cachekey import KEY_VERSION, Ingredients, explain_miss
from orchestrator.loader import load_pipeline
from orchestrator.overrides import apply_overrides, parse_overrides

BASE = Ingredients(image="sha256:" + "a" * 64, command=("python3", "/app/train.py"), entrypoint=None,
                   workdir="/workspace", env={}, params={"noise": 10.0, "n_estimators": 100, "deep": True},
                   inputs={}, upstream={})


def with_params(**params: object) -> Ingredients:
    return replace(BASE, params={**BASE.params, **params})


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("noise", 10, "param noise 10.0 (float) -> 10 (int)"),
    ("n_estimators", 100.0, "param n_estimators 100 (int) -> 100.0 (float)"),
    ("deep", 1, "param deep true (bool) -> 1 (int)"),
    ("n_estimators", "100", 'param n_estimators 100 (int) -> "100" (string)'),
    ("n_estimators", 300, "param n_estimators 100 -> 300"),
])
def test_values_equal_in_python_but_not_in_json_are_a_miss_that_says_why(name: str, value: object,
                                                                          reason: str) -> None:
    changed = with_params(**{name: value})
    assert changed.key() != BASE.key()
    assert explain_miss(BASE, changed) == [reason]


def test_the_same_value_is_the_same_key_and_no_reason() -> None:
    again = Ingredients.from_json(BASE.to_json())
    assert again.key() == BASE.key()
    assert explain_miss(BASE, again) == []


def test_history_of_the_previous_recipe_is_explained_as_a_recipe_change() -> None:
    assert KEY_VERSION == 2
    stored_v1 = json.dumps({**asdict(BASE), "version": 1, "params": {"noise": 10, "n_estimators": 100}})
    assert explain_miss(Ingredients.from_json(stored_v1), BASE) == ["cache recipe changed (v1 -> v2)"]


def test_non_finite_numbers_cannot_make_a_key() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        with_params(noise=float("nan")).key()


def test_a_yaml_value_and_the_same_spelling_in_p_make_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("stages:\n  data:\n    image: busybox\n    params: {noise: 10.0, n: 100, big: 1e2}\n")
    pipeline = load_pipeline(path)
    again = apply_overrides(pipeline, parse_overrides(("data.noise=10.0", "data.n=100", "data.big=1e2")))
    assert json.dumps(again.stages["data"].params) == json.dumps(pipeline.stages["data"].params)
    other = apply_overrides(pipeline, parse_overrides(("data.noise=10",)))
    before = replace(BASE, params=pipeline.stages["data"].params)
    after = replace(BASE, params=other.stages["data"].params)
    assert before.key() != after.key()
    assert explain_miss(before, after) == ["param noise 10.0 (float) -> 10 (int)"]
