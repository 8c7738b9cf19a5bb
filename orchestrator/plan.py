"""The stage graph and what a run executes: cycle check, selection (--stage, --from), topological order, drawings.

Pure networkx over the Pipeline's stages and needs; the only module importing networkx. Knows nothing of files,
images, caches or Docker.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import networkx as nx  # type: ignore[import-untyped]

from orchestrator.errors import UsageError
from orchestrator.spec import Pipeline


@dataclass(frozen=True)
class Selection:
    """Which stages a run executes: all (the default), exactly `stage`, or `from_stage` and its descendants."""

    stage: str | None = None
    from_stage: str | None = None


@dataclass(frozen=True)
class Plan:
    graph: nx.DiGraph  # the whole pipeline: an edge upstream -> downstream for every entry in `needs`
    order: tuple[str, ...]  # the stages this run executes, topologically sorted, ties broken by name

    def upstream(self, stage: str) -> tuple[str, ...]:
        """The stage's direct needs, sorted."""
        return tuple(sorted(self.graph.predecessors(stage)))

    def downstream(self, stage: str) -> tuple[str, ...]:
        """Every stage that depends on `stage`, directly or not, in topological order (ties by name)."""
        return tuple(nx.lexicographical_topological_sort(self.graph.subgraph(nx.descendants(self.graph, stage))))


def build_plan(pipeline: Pipeline, selection: Selection = Selection()) -> Plan:
    """The plan of `selection`: a cycle is a SpecError on the needs of its first stage in the file, an unknown
    stage in the selection a UsageError."""
    graph = dependency_graph(pipeline)
    if selection.stage is not None and selection.from_stage is not None:
        raise UsageError("--stage and --from cannot be combined: pick one")
    if selection.stage is not None:
        return Plan(graph, (_known(graph, selection.stage),))
    if selection.from_stage is not None:
        start = _known(graph, selection.from_stage)
        chosen = graph.subgraph({start, *nx.descendants(graph, start)})
        return Plan(graph, tuple(nx.lexicographical_topological_sort(chosen)))
    return Plan(graph, tuple(nx.lexicographical_topological_sort(graph)))


def dependency_graph(pipeline: Pipeline) -> nx.DiGraph:
    """Every stage, and an edge upstream -> downstream per entry in `needs`; a cycle raises a SpecError."""
    check_acyclic(pipeline)
    graph = nx.DiGraph()
    graph.add_nodes_from(pipeline.stages)
    graph.add_edges_from((up, name) for name, stage in pipeline.stages.items() for up in stage.needs)
    return graph


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


def _known(graph: nx.DiGraph, stage: str) -> str:
    if stage in graph:
        return stage
    names = sorted(graph)
    close = difflib.get_close_matches(stage, names, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(names[:12]) + (f", ... and {len(names) - 12} more" if len(names) > 12 else "")
    raise UsageError(f"unknown stage {stage!r}{hint} (stages: {shown})")
