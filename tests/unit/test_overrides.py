"""`-p` overrides: parsed by the file's rules, checked against the pipeline (did you mean), `+` to add."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.loader import load_pipeline
from orchestrator.overrides import apply_overrides, parse_overrides
from orchestrator.spec import Pipeline

PIPELINE = """\
stages:
  data:
    image: busybox
    params: {seed: 42}
  train:
    image: busybox
    needs: [data]
    params:
      n_estimators: 100
      model: {depth: 3, kind: gb}
"""


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE)
    return load_pipeline(path)


def params(pipeline: Pipeline, *items: str) -> dict[str, object]:
    return dict(apply_overrides(pipeline, parse_overrides(items)).stages["train"].params)


def test_values_are_read_as_the_file_reads_them() -> None:
    assert parse_overrides(("a.i=10", "a.f=10.0", "a.e=1e2", "a.b=yes", "a.l=[1, 2]", "a.d=2024-01-31",
                            'a.s="007"', "a.n=", "a.m={x: 1}")) == {
        "a.i": 10, "a.f": 10.0, "a.e": "1e2", "a.b": True, "a.l": [1, 2], "a.d": "2024-01-31", "a.s": "007",
        "a.n": None, "a.m": {"x": 1}}


def test_an_existing_param_is_replaced_and_nested_keys_go_by_dots(pipeline: Pipeline) -> None:
    assert params(pipeline, "train.n_estimators=300", "train.model.depth=5") == {
        "n_estimators": 300, "model": {"depth": 5, "kind": "gb"}}
    assert pipeline.stages["train"].params["n_estimators"] == 100  # the loaded pipeline is untouched


def test_a_typo_in_a_param_is_refused_with_a_hint_and_the_way_to_add_one(pipeline: Pipeline) -> None:
    with pytest.raises(UsageError) as info:
        params(pipeline, "train.n_estimatorz=3")
    assert str(info.value) == ("param override train.n_estimatorz: stage train has no param 'n_estimatorz': "
                               "did you mean 'n_estimators'? (to add a new param, write -p +train.n_estimatorz=...)")


def test_a_typo_in_a_stage_is_refused_with_a_hint(pipeline: Pipeline) -> None:
    with pytest.raises(UsageError, match=r"^param override trian.x: unknown stage 'trian': did you mean 'train'\?$"):
        params(pipeline, "trian.x=3")
    with pytest.raises(UsageError, match=r"unknown stage 'zzz': there are data, train$"):
        params(pipeline, "zzz.x=3")


def test_a_typo_in_a_nested_key_is_refused(pipeline: Pipeline) -> None:
    with pytest.raises(UsageError, match=r"no param 'model.dpth': did you mean 'depth'\?"):
        params(pipeline, "train.model.dpth=3")
    with pytest.raises(UsageError, match=r"param 'n_estimators' is not a mapping, so it has no 'x'"):
        params(pipeline, "train.n_estimators.x=3")


def test_plus_adds_a_new_param_and_refuses_an_existing_one(pipeline: Pipeline) -> None:
    assert params(pipeline, "+train.warm_start=true", "+train.opt.lr=0.1")["warm_start"] is True
    assert params(pipeline, "+train.opt.lr=0.1")["opt"] == {"lr": 0.1}
    with pytest.raises(UsageError, match=r"param 'n_estimators' already exists; drop the \+ to replace it"):
        params(pipeline, "+train.n_estimators=3")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.Inf", "[1, .nan]", "{a: .inf}"])
def test_non_finite_values_are_refused(value: str) -> None:
    with pytest.raises(UsageError, match="is not a finite number; JSON .* cannot hold NaN or infinity"):
        parse_overrides((f"train.x={value}",))


@pytest.mark.parametrize("item", ["train", "train=3", ".x=3", "train.=3", "+train=3", "train..x=3"])
def test_malformed_items_say_the_form(item: str) -> None:
    with pytest.raises(UsageError, match=r"use STAGE.KEY=VALUE .* or \+STAGE.KEY=VALUE to add a param"):
        parse_overrides((item,))


def test_a_value_that_is_not_yaml_says_to_quote_it() -> None:
    with pytest.raises(UsageError, match=r"train.x: YAML syntax: .* \(quote the value to pass a string\)"):
        parse_overrides(("train.x=[1,",))
