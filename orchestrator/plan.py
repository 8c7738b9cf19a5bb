"""The stage graph and what a run executes: cycle check, selection (--stage, --from), topological order, drawings.

Over the Pipeline's stages and needs; the only module importing networkx. Knows nothing of files, images, caches
or Docker. The order a run, a dry run and `pipe status` need is computed with the standard library (a heap over
the stages whose needs are done: networkx's lexicographical_topological_sort, the same order), so those commands
do not import networkx (issue 20: about 0.09 s of their start-up); `Plan.graph`, for `pipe dag` and whoever
wants the whole graph, builds the networkx DiGraph when first asked.
"""

from __future__ import annotations

import difflib
import heapq
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from orchestrator.errors import UsageError
from orchestrator.spec import Pipeline

if TYPE_CHECKING:
    import networkx as nx  # type: ignore[import-untyped]


@dataclass(frozen=True)
class Selection:
    """Which stages a run executes: all (the default), exactly `stage`, or `from_stage` and its descendants."""

    stage: str | None = None
    from_stage: str | None = None


@dataclass(frozen=True)
class Plan:
    needs: Mapping[str, tuple[str, ...]]  # the whole pipeline: every stage -> its needs, in file order
    order: tuple[str, ...]  # the stages this run executes, topologically sorted, ties broken by name

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The whole pipeline as a networkx DiGraph: an edge upstream -> downstream for every entry in `needs`."""
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(self.needs)
        graph.add_edges_from((up, name) for name, needs in self.needs.items() for up in needs)
        return graph

    def upstream(self, stage: str) -> tuple[str, ...]:
        """The stage's direct needs, sorted."""
        return tuple(sorted(set(self.needs[stage])))

    def downstream(self, stage: str) -> tuple[str, ...]:
        """Every stage that depends on `stage`, directly or not, in topological order (ties by name)."""
        return _ordered(self.needs, _descendants(self.needs, stage))


def build_plan(pipeline: Pipeline, selection: Selection = Selection()) -> Plan:
    """The plan of `selection`: a cycle is a SpecError on the needs of its first stage in the file, an unknown
    stage in the selection a UsageError."""
    check_acyclic(pipeline)
    needs = {name: tuple(stage.needs) for name, stage in pipeline.stages.items()}
    if selection.stage is not None and selection.from_stage is not None:
        raise UsageError("--stage and --from cannot be combined: pick one")
    if selection.stage is not None:
        return Plan(needs, (_known(needs, selection.stage),))
    if selection.from_stage is not None:
        start = _known(needs, selection.from_stage)
        return Plan(needs, _ordered(needs, {start, *_descendants(needs, start)}))
    return Plan(needs, _ordered(needs, needs))


def dependency_graph(pipeline: Pipeline) -> nx.DiGraph:
    """Every stage, and an edge upstream -> downstream per entry in `needs`; a cycle raises a SpecError."""
    return build_plan(pipeline).graph


def _ordered(needs: Mapping[str, Iterable[str]], chosen: Collection[str]) -> tuple[str, ...]:
    """The `chosen` stages (an acyclic set) in topological order, the smallest name first among those ready:
    networkx.lexicographical_topological_sort of the subgraph on `chosen`."""
    waiting: dict[str, int] = {}
    children: dict[str, list[str]] = {name: [] for name in chosen}
    for name in chosen:
        ups = {up for up in needs[name] if up in children}
        waiting[name] = len(ups)
        for up in ups:
            children[up].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for child in children[name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    return tuple(order)


def _descendants(needs: Mapping[str, Iterable[str]], stage: str) -> set[str]:
    children: dict[str, list[str]] = {name: [] for name in needs}
    for name, ups in needs.items():
        for up in ups:
            children[up].append(name)
    found: set[str] = set()
    pending = [stage]
    while pending:
        for child in children[pending.pop()]:
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def check_acyclic(pipeline: Pipeline) -> None:
    """Raises a cycle in `needs` as a SpecError on the needs of its first stage in the file, naming it in the
    direction data flows: `cycle: data -> train -> data`. Plain depth-first search: the loader calls it on every
    file, and building a networkx graph just for this would double the planning cost."""
    done: set[str] = set()
    for start in pipeline.stages:
        if start in done:
            continue
        path, pending = [start], [iter(pipeline.stages[start].needs)]  # path[i] needs path[i + 1]
        on_path = {start}
        while path:
            up = next(pending[-1], None)
            if up is None:
                done.add(path[-1])
                on_path.discard(path.pop())
                pending.pop()
            elif up in on_path:
                cycle = path[path.index(up):][::-1]  # reversed: each stage feeds the next
                position = {name: i for i, name in enumerate(pipeline.stages)}
                first = min(range(len(cycle)), key=lambda i: position[cycle[i]])  # start where the file does
                cycle = cycle[first:] + cycle[:first]
                raise pipeline.error(f"stages.{cycle[0]}.needs", "cycle: " + " -> ".join([*cycle, cycle[0]]))
            elif up not in done:
                path.append(up)
                on_path.add(up)
                pending.append(iter(pipeline.stages[up].needs))


def to_text(plan: Plan) -> str:
    """One line per stage in run order with its needs: `train     <- data`."""
    width = max(map(len, plan.order), default=0)
    lines = []
    for name in plan.order:
        needs = plan.upstream(name)
        lines.append(f"{name:<{width}}  <- {', '.join(needs)}" if needs else name)
    return "\n".join(lines) + "\n"


def to_mermaid(plan: Plan) -> str:
    """A Mermaid flowchart of the plan's stages; ids are s0, s1, ... since words such as `end` are reserved."""
    ids = {name: f"s{i}" for i, name in enumerate(plan.order)}
    lines = ["flowchart TD"]
    lines += [f'    {ids[name]}["{name}"]' for name in plan.order]
    lines += [f"    {ids[up]} --> {ids[name]}" for name in plan.order for up in plan.upstream(name) if up in ids]
    return "\n".join(lines) + "\n"


def to_dot(plan: Plan) -> str:
    """A Graphviz digraph of the plan's stages, upstream on the left."""
    chosen = set(plan.order)
    lines = ["digraph pipeline {", "    rankdir=LR;", "    node [shape=box];"]
    lines += [f'    "{name}";' for name in plan.order]
    lines += [f'    "{up}" -> "{name}";' for name in plan.order for up in plan.upstream(name) if up in chosen]
    return "\n".join([*lines, "}"]) + "\n"


def _known(needs: Mapping[str, object], stage: str) -> str:
    if stage in needs:
        return stage
    names = sorted(needs)
    close = difflib.get_close_matches(stage, names, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(names[:12]) + (f", ... and {len(names) - 12} more" if len(names) > 12 else "")
    raise UsageError(f"unknown stage {stage!r}{hint} (stages: {shown})")
