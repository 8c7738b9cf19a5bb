"""One forecast per stage: restore it from the cache, or run it, and why. `pipe run`, `pipe run --dry-run` and
`pipe status` all call `decide`, so they cannot give different reasons (docker-compose's ConvergencePlan idea).

A decision is plain data. Nothing here starts, builds or writes anything; history is read through `History`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from orchestrator.cache import Fetched, Lookup, Manifest
from orchestrator.cachekey import KEY_VERSION, Ingredients, explain_miss
from orchestrator.results import StageStatus
from orchestrator.spec import Pipeline
from orchestrator.store.records import StageRunInfo
from orchestrator.units import format_bytes, format_duration

WORKDIR = "/workspace"


class History(Protocol):
    """What a decision reads from history."""

    def last_success(self, stage: str) -> StageRunInfo | None:
        """The latest record of the stage that succeeded (or was cached with its ingredients)."""
        ...

    def last_record(self, stage: str) -> StageRunInfo | None:
        """The latest finished record of the stage, whatever its status."""
        ...


@dataclass(frozen=True)
class Decision:
    stage: str
    run: bool  # False: restore `manifest`
    reasons: tuple[str, ...]  # for people: "cached from run R", "param seed 1 -> 2", "upstream data runs first"
    ingredients: Ingredients | None = None  # None while an upstream or the image is not known yet
    manifest: Manifest | None = None
    problem: str | None = None  # a damaged cache entry that was passed over (a warning)
    remote: str | None = None  # a hit found in this remote, not in the local cache: "cached (remote)"
    fetched: Fetched | None = None  # what a run's remote hit downloaded (a forecast downloads nothing)


class Lookups(Protocol):
    """What decide() asks of a cache (cachestore.CacheStore): local, remote or layered, all alike here."""

    def lookup(self, key: str) -> Lookup:
        ...


def hit_reason(lookup: Lookup) -> str:
    """ "cached from run R", or "cached (remote) from run R" with what a run fetched for it."""
    assert lookup.manifest is not None
    if lookup.remote is None:
        return f"cached from run {lookup.manifest.run_id}"
    reason = f"cached (remote) from run {lookup.manifest.run_id}"
    if (f := lookup.fetched) is not None:
        reason += (f", fetched {f.files} file{'s' * (f.files != 1)}, {format_bytes(f.bytes)} in "
                   f"{format_duration(f.seconds)}")
    return reason


def ingredients_for(
    pipeline: Pipeline, name: str, image_id: str, inputs: Mapping[str, str], upstream: Mapping[str, str]
) -> Ingredients:
    """What a stage's cache key is made of (cachekey.py documents the recipe)."""
    stage = pipeline.stages[name]
    argv = stage.argv()
    return Ingredients(
        version=KEY_VERSION,
        image=image_id,
        command=list(argv) if argv is not None else None,
        entrypoint=list(stage.entrypoint) if stage.entrypoint is not None else None,
        workdir=WORKDIR,
        env=dict(stage.env),
        params=dict(stage.params),
        inputs=dict(inputs),
        upstream=dict(upstream),
    )


def decide(
    pipeline: Pipeline,
    name: str,
    *,
    image_id: str | None,
    image_reason: str = "",
    inputs: Mapping[str, str],
    upstream: Mapping[str, str | None],
    force: frozenset[str],
    cache: Lookups,
    history: History,
) -> Decision:
    """Whether `name` runs or is restored, and why.

    `upstream` maps each stage in `needs` to the digest of its outputs, or None while it has yet to run (a
    forecast); `image_id` is None while the image has yet to be built, with `image_reason` saying why."""
    stage = pipeline.stages[name]
    waiting = [up for up in stage.needs if upstream.get(up) is None]
    if waiting:
        return Decision(name, True, tuple(f"upstream {up} runs first" for up in waiting))
    if image_id is None:
        return Decision(name, True, (image_reason or "image would be built",))
    ingredients = ingredients_for(pipeline, name, image_id, inputs, {up: str(upstream[up]) for up in stage.needs})
    problem = None
    if stage.cache and name not in force:
        lookup = cache.lookup(ingredients.key())
        if lookup.manifest is not None:
            return Decision(name, False, (hit_reason(lookup),), ingredients, lookup.manifest, lookup.problem,
                            lookup.remote, lookup.fetched)
        problem = lookup.problem
    reasons = miss_reasons(name, stage.cache, ingredients, history, force)
    return Decision(name, True, tuple(reasons), ingredients, problem=problem)


def miss_reasons(name: str, cacheable: bool, ingredients: Ingredients, history: History,
                 force: frozenset[str]) -> list[str]:
    """Why a stage runs: forced, uncached, each ingredient changed since its last success, or how it last ended."""
    if name in force:
        return ["forced"]
    if not cacheable:
        return ["cache: false"]
    previous = history.last_success(name)
    if previous is None or not previous.ingredients_json:
        return [last_outcome(history.last_record(name))]
    return explain_miss(Ingredients.from_json(previous.ingredients_json), ingredients) \
        or ["outputs not in the cache"]


def last_outcome(record: StageRunInfo | None) -> str:
    """"never ran", or how the stage's latest record ended when it never succeeded."""
    if record is None or record.status is None:
        return "never ran"
    if record.status is StageStatus.FAILED:
        detail = f"exit {record.exit_code}" if record.exit_code is not None else record.reason
        return f"last run failed ({detail})" if detail else "last run failed"
    return f"last run {record.status.value}"


def forecast(
    pipeline: Pipeline,
    order: tuple[str, ...],
    *,
    images: Mapping[str, tuple[str | None, str]],
    inputs: Mapping[str, Mapping[str, str]],
    upstream: Mapping[str, str],
    force: frozenset[str],
    cache: Lookups,
    history: History,
) -> list[Decision]:
    """decide() for every stage in plan order, as a dry run: a stage restored passes its digest down, a stage
    that would run leaves its dependents waiting. `images` is stage -> (image id or None, reason)."""
    digests: dict[str, str | None] = dict(upstream)
    decisions = []
    for name in order:
        image_id, image_reason = images[name]
        needs = pipeline.stages[name].needs
        decision = decide(pipeline, name, image_id=image_id, image_reason=image_reason, inputs=inputs[name],
                          upstream={up: digests.get(up) for up in needs}, force=force, cache=cache,
                          history=history)
        digests[name] = decision.manifest.digest if decision.manifest is not None else None
        decisions.append(decision)
    return decisions
