"""plan: the stage graph, the order of a run, selections, cycles and the drawings of `pipe dag`."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.errors import SpecError, UsageError
from orchestrator.plan import Selection, build_plan, check_acyclic, to_dot, to_mermaid, to_text
from orchestrator.spec import Pipeline


def pipeline(needs: dict[str, list[str]]) -> Pipeline:
    stages: dict[str, Any] = {name: {"image": "busybox", "needs": ups} for name, ups in needs.items()}
    return Pipeline.model_validate({"stages": stages})


# predict and report both need evaluate; written out of order on purpose
ML = pipeline({
    "report": ["evaluate"],
    "predict": ["train", "evaluate"],
    "evaluate": ["train", "data"],
    "train": ["data"],
    "data": [],
    "lint": [],
})


def test_order_is_topological_with_ties_broken_by_name() -> None:
    assert build_plan(ML).order == ("data", "lint", "train", "evaluate", "predict", "report")


def test_selecting_one_stage_runs_exactly_it() -> None:
    plan = build_plan(ML, Selection(stage="train"))
    assert plan.order == ("train",)
    assert set(plan.graph) == set(ML.stages)  # the graph stays whole: upstream outputs are looked up in it


def test_selecting_from_a_stage_runs_it_and_everything_downstream() -> None:
    assert build_plan(ML, Selection(from_stage="train")).order == ("train", "evaluate", "predict", "report")
    assert build_plan(ML, Selection(from_stage="report")).order == ("report",)


def test_unknown_stage_in_a_selection_suggests_the_close_one() -> None:
    with pytest.raises(UsageError) as info:
        build_plan(ML, Selection(stage="trian"))
    assert str(info.value) == (
        "unknown stage 'trian': did you mean 'train'? (stages: data, evaluate, lint, predict, report, train)"
    )


def test_unknown_stage_without_a_close_one_lists_a_few_stages() -> None:
    many = pipeline({f"s{i:02d}": [] for i in range(20)})
    with pytest.raises(UsageError) as info:
        build_plan(many, Selection(from_stage="zzz"))
    assert str(info.value) == (
        "unknown stage 'zzz' (stages: s00, s01, s02, s03, s04, s05, s06, s07, s08, s09, s10, s11, ... and 8 more)"
    )


def test_stage_and_from_cannot_be_combined() -> None:
    with pytest.raises(UsageError, match="--stage and --from cannot be combined"):
        build_plan(ML, Selection(stage="train", from_stage="data"))


def test_upstream_is_the_direct_needs_sorted() -> None:
    plan = build_plan(ML)
    assert plan.upstream("predict") == ("evaluate", "train")
    assert plan.upstream("data") == ()


def test_downstream_is_every_descendant_in_order() -> None:
    plan = build_plan(ML)
    assert plan.downstream("data") == ("train", "evaluate", "predict", "report")
    assert plan.downstream("report") == ()


def test_cycle_is_named_in_the_direction_data_flows() -> None:
    cyclic = pipeline({"ok": [], "evaluate": ["ok", "train"], "data": ["evaluate"], "train": ["data"]})
    with pytest.raises(SpecError) as info:
        build_plan(cyclic)
    assert info.value.key == "stages.evaluate.needs"
    assert info.value.problem == "cycle: evaluate -> data -> train -> evaluate"


def test_self_need_is_a_cycle() -> None:
    with pytest.raises(SpecError, match=r"stages\.data\.needs: cycle: data -> data$"):
        check_acyclic(pipeline({"data": ["data"]}))


def test_acyclic_check_survives_a_long_chain() -> None:
    # written last stage first, so the search from the first stage walks all 3,000: deeper than recursion allows
    chain = pipeline({f"s{i}": [f"s{i - 1}"] if i else [] for i in reversed(range(3000))})
    check_acyclic(chain)
    assert build_plan(chain, Selection(from_stage="s2998")).order == ("s2998", "s2999")


DIAMOND = pipeline({"data": [], "train": ["data"], "baseline": ["data"], "evaluate": ["train", "baseline"]})


def test_text_drawing_lists_each_stage_with_its_needs() -> None:
    assert to_text(build_plan(DIAMOND)) == (
        "data\n"
        "baseline  <- data\n"
        "train     <- data\n"
        "evaluate  <- baseline, train\n"
    )


def test_mermaid_drawing() -> None:
    assert to_mermaid(build_plan(DIAMOND, Selection(from_stage="train"))) == (
        "flowchart TD\n"
        '    s0["train"]\n'
        '    s1["evaluate"]\n'
        "    s0 --> s1\n"
    )


def test_dot_drawing() -> None:
    assert to_dot(build_plan(DIAMOND)) == (
        "digraph pipeline {\n"
        "    rankdir=LR;\n"
        "    node [shape=box];\n"
        '    "data";\n'
        '    "baseline";\n'
        '    "train";\n'
        '    "evaluate";\n'
        '    "data" -> "baseline";\n'
        '    "data" -> "train";\n'
        '    "baseline" -> "evaluate";\n'
        '    "train" -> "evaluate";\n'
        "}\n"
    )


def test_the_run_order_is_networkx_lexicographical_topological_sort() -> None:
    """plan orders stages without networkx (issue 20: off the status and run paths); networkx is the oracle."""
    import random

    import networkx as nx  # type: ignore[import-untyped]

    from orchestrator.plan import _descendants, _ordered

    for seed in range(100):
        rng = random.Random(seed)
        names = [f"s{rng.randrange(1000):03d}-{i}" for i in range(rng.randint(1, 50))]
        needs = {name: tuple(rng.choice(names[:i]) for _ in range(rng.randint(0, min(i, 4))))
                 for i, name in enumerate(names)}
        graph = nx.DiGraph()
        graph.add_nodes_from(needs)
        graph.add_edges_from((up, name) for name, ups in needs.items() for up in ups)
        assert _ordered(needs, needs) == tuple(nx.lexicographical_topological_sort(graph))
        start = rng.choice(names)
        below = _descendants(needs, start)
        assert below == nx.descendants(graph, start)
        chosen = below | {start}
        assert _ordered(needs, chosen) == tuple(nx.lexicographical_topological_sort(graph.subgraph(chosen)))
