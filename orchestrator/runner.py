"""One stage of one run: cache key, restore on a hit, container on a miss, outputs saved, metrics, gate, record.

StageRunner is what parallel.execute calls for every attempt. It is built by api.run_pipeline with the real parts
(cache, executor, store) and knows nothing of the CLI or of scheduling.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.cache import Cache, Manifest
from orchestrator.cachekey import KEY_VERSION, Ingredients, explain_miss
from orchestrator.errors import PipeError
from orchestrator.events import Reporter, StageOutput, StagePlanned, Warning
from orchestrator.executor import (
    LABEL_HOST,
    LABEL_MANAGED,
    LABEL_PID,
    LABEL_PIPELINE,
    LABEL_RUN,
    LABEL_STAGE,
    ContainerSpec,
    Executor,
    Mount,
    Outcome,
    SecretFile,
)
from orchestrator.hashing import HashMemo, TreeDigest, hash_tree
from orchestrator.metrics import MetricsError, check_gate, read_metrics
from orchestrator.results import Artifact, StageResult, StageStatus
from orchestrator.spec import Pipeline
from orchestrator.state import StateDir
from orchestrator.store.store import Store

WORKDIR = "/workspace"


@dataclass(frozen=True)
class Upstream:
    """Where an upstream stage's outputs are and their content digest (the key uses the digest, not its key)."""

    path: Path
    digest: str


def invoking_user() -> str:
    return f"{os.getuid()}:{os.getgid()}"


def container_user(stage_user: str | None) -> str:
    if stage_user is None:
        return invoking_user()
    return "0:0" if stage_user == "root" else stage_user


class StageRunner:
    """Runs attempts of the stages of one run. Thread-safe: each call touches only its own stage's folders."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        run_id: str,
        state: StateDir,
        store: Store,
        cache: Cache,
        executor: Executor,
        reporter: Reporter,
        image_ids: Mapping[str, str],
        input_digests: Mapping[str, dict[str, str]],
        upstream: dict[str, Upstream],
        secrets: Mapping[str, str],
        force: frozenset[str],
    ) -> None:
        self.pipeline, self.run_id, self.state = pipeline, run_id, state
        self.store, self.cache, self.executor, self.reporter = store, cache, executor, reporter
        self.image_ids, self.input_digests, self.secrets, self.force = image_ids, input_digests, secrets, force
        self._upstream = upstream  # grows as stages finish; earlier runs' outputs for --stage
        self._lock = threading.Lock()

    def ingredients(self, name: str) -> Ingredients:
        with self._lock:
            upstream = {up: self._upstream[up].digest for up in self.pipeline.stages[name].needs}
        return ingredients_for(self.pipeline, name, self.image_ids[name], self.input_digests[name], upstream)

    def __call__(self, name: str, attempt: int) -> StageResult:
        stage = self.pipeline.stages[name]
        ingredients = self.ingredients(name)
        key = ingredients.key()
        out = self.state.outputs_dir(self.run_id, name)
        if stage.cache and name not in self.force:
            lookup = self.cache.lookup(key)
            if lookup.problem:
                self.reporter.emit(Warning(f"{name}: {lookup.problem}; re-running"))
            if lookup.manifest is not None:
                return self._restore(name, lookup.manifest, ingredients, attempt)
        reasons = self._miss_reasons(name, ingredients)
        self.reporter.emit(StagePlanned(name, True, tuple(reasons)))
        self._prepare(name, out)
        started = datetime.now(UTC)
        self.store.mark_stage_running(self.run_id, name, attempt, started,
                                      log_path=str(self.state.log_path(self.run_id, name)))
        spec = self._container_spec(name, out)
        result = self.executor.run(spec, lambda line: self.reporter.emit(StageOutput(name, line)))
        base = StageResult(
            stage=name,
            status=StageStatus.FAILED,
            reason=result.reason,
            exit_code=result.exit_code,
            attempts=attempt,
            infra_error=result.outcome is Outcome.ERROR,
            cache_key=key,
            image_id=self.image_ids[name],
            started_at=result.started_at,
            finished_at=result.finished_at,
            peak_memory_bytes=result.peak_memory_bytes,
            cpu_seconds=result.cpu_seconds,
            log_path=str(spec.log_path),
            outputs_path=str(out),
        )
        if result.outcome is Outcome.CANCELLED:
            remove_outputs(out)  # partial outputs of an interrupted stage are discarded
            final = replace(base, status=StageStatus.CANCELLED)
        elif result.outcome is not Outcome.SUCCEEDED:
            final = base  # never cached; left on disk for debugging, unless they filled it
            if result.disk_full:
                remove_outputs(out)  # else history could not record this very failure
        else:
            final = self._succeeded(name, base, out, key, ingredients)
        return self._record(final, ingredients, ", ".join(reasons))

    def _miss_reasons(self, name: str, ingredients: Ingredients) -> list[str]:
        return miss_reasons(self.pipeline, name, ingredients, self.store, self.force)

    def _prepare(self, name: str, out: Path) -> None:
        remove_outputs(out)  # a retry starts from an empty /outputs
        out.mkdir(parents=True)
        meta = self.state.meta_dir(self.run_id, name)
        meta.mkdir(parents=True, exist_ok=True)
        params = json.dumps(self.pipeline.stages[name].params, indent=2, sort_keys=True)
        (meta / "params.json").write_text(params + "\n")

    def _container_spec(self, name: str, out: Path) -> ContainerSpec:
        stage = self.pipeline.stages[name]
        resources = self.pipeline.resources_of(name)
        with self._lock:
            upstream = {up: self._upstream[up].path for up in stage.needs}
        mounts = [
            Mount(out, "/outputs", read_only=False),
            Mount(self.state.meta_dir(self.run_id, name), "/pipe"),
            *(Mount(path, f"/inputs/{up}") for up, path in sorted(upstream.items())),
            *(Mount(self.pipeline.root / rel, f"{WORKDIR}/{rel}") for rel in stage.inputs),
        ]
        return ContainerSpec(
            name=name,
            image_id=self.image_ids[name],
            command=stage.argv(),
            entrypoint=stage.entrypoint,
            env={**stage.env, "PIPE_STAGE": name, "PIPE_RUN_ID": self.run_id},
            mounts=tuple(mounts),
            workdir=WORKDIR,
            cpus=resources.cpus,
            memory_bytes=resources.memory,
            gpus=resources.gpus,
            pids=resources.pids,
            timeout_s=self.pipeline.timeout_of(name),
            labels={
                LABEL_MANAGED: "1",
                LABEL_PIPELINE: str(self.state.root),
                LABEL_RUN: self.run_id,
                LABEL_STAGE: name,
                LABEL_PID: str(os.getpid()),
                LABEL_HOST: os.uname().nodename,
            },
            user=container_user(stage.user),
            network=stage.network,
            tmp_bytes=self.pipeline.defaults.tmp_size,
            secrets=tuple(SecretFile(s, self.secrets[s]) for s in stage.secrets),
            log_path=self.state.log_path(self.run_id, name),
        )

    def _succeeded(self, name: str, base: StageResult, out: Path, key: str, ingredients: Ingredients) -> StageResult:
        stage = self.pipeline.stages[name]
        try:
            tree = hash_tree(out)
        except PipeError as e:  # the stage left a fifo, socket, device or unreadable file: its fault, not pipe's
            return replace(base, reason=f"outputs not stored: {e}")
        if stage.cache:
            self.cache.save(key, out, tree, ingredients, self.run_id, name)
        result = replace(base, status=StageStatus.SUCCEEDED, reason="", outputs_digest=tree.digest,
                         artifacts=artifacts_of(tree))
        return self._finish_outputs(name, result, out, tree)

    def _restore(self, name: str, manifest: Manifest, ingredients: Ingredients, attempt: int) -> StageResult:
        self.reporter.emit(StagePlanned(name, False, (f"cached from run {manifest.run_id}",)))
        out = self.state.outputs_dir(self.run_id, name)
        now = datetime.now(UTC)
        remove_outputs(out)
        self.cache.restore(manifest, out)
        tree = TreeDigest(manifest.digest, manifest.files, manifest.empty_dirs)
        result = StageResult(
            stage=name,
            status=StageStatus.CACHED,
            reason=f"cached from run {manifest.run_id}",
            attempts=attempt,
            cache_key=manifest.key,
            cached_from=manifest.run_id,
            image_id=self.image_ids[name],
            started_at=now,
            finished_at=datetime.now(UTC),
            outputs_path=str(out),
            outputs_digest=tree.digest,
            artifacts=artifacts_of(tree),
        )
        return self._record(self._finish_outputs(name, result, out, tree), ingredients, "")

    def _finish_outputs(self, name: str, result: StageResult, out: Path, tree: TreeDigest) -> StageResult:
        """Metrics and gate, shared by fresh and restored outputs; publishes the outputs to downstream stages."""
        stage = self.pipeline.stages[name]
        if stage.metrics is not None:
            try:
                metrics = read_metrics(out, stage.metrics)
            except MetricsError as e:
                return replace(result, status=StageStatus.FAILED, reason=str(e))
            result = replace(result, metrics=metrics)
            if stage.gate is not None:
                last = self.store.last_gate_pass(self.pipeline.display_name, name, stage.gate.metric)
                if problem := check_gate(stage.gate, metrics, last):
                    return replace(result, status=StageStatus.FAILED, reason=problem)
        with self._lock:
            self._upstream[name] = Upstream(out, tree.digest)
        return result

    def _record(self, result: StageResult, ingredients: Ingredients, reasons: str) -> StageResult:
        stage = self.pipeline.stages[result.stage]
        if result.status is StageStatus.SUCCEEDED and reasons:
            result = replace(result, reason=f"ran: {reasons}")
        gate_passed = None
        if stage.gate is not None and result.metrics:
            gate_passed = result.ok
        self.store.record_stage(
            self.run_id,
            result,
            ingredients_json=ingredients.to_json(),
            user=container_user(stage.user),
            hermetic=not stage.network,
            gate_passed=gate_passed,
        )
        return result


def remove_outputs(out: Path) -> None:
    """Delete a stage's outputs folder, with the folders the stage made read-only (a 0500 folder stops even
    its owner from deleting in it): each is opened to its owner first. Symlinks are never followed: the
    stage planted them, and they could name any host path. Called only once the container is gone."""
    if out.is_symlink() or not out.is_dir():
        out.unlink(missing_ok=True)
        return
    with suppress(OSError):
        out.chmod(0o700)
    for folder, dirs, _ in os.walk(out):  # top-down: a folder is opened before it is listed
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with suppress(OSError):
                    os.chmod(path, 0o700)
    shutil.rmtree(out, ignore_errors=True)


def artifacts_of(tree: TreeDigest) -> tuple[Artifact, ...]:
    return tuple(Artifact(f.path, f.size, f.digest) for f in tree.files)


def hash_inputs(pipeline: Pipeline, stages: tuple[str, ...], memo: HashMemo) -> dict[str, dict[str, str]]:
    """{stage: {input path: content digest}}; each distinct path is hashed once, unchanged files not read."""
    digests: dict[str, str] = {}
    for name in stages:
        for rel in pipeline.stages[name].inputs:
            if rel not in digests:
                digests[rel] = hash_tree(pipeline.root / rel, memo).digest
    memo.flush()
    return {name: {rel: digests[rel] for rel in pipeline.stages[name].inputs} for name in stages}


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


def miss_reasons(pipeline: Pipeline, name: str, ingredients: Ingredients, store: Store, force: frozenset[str]) -> list[str]:
    """Why a stage runs: forced, uncached, or each ingredient changed since its last successful run."""
    if name in force:
        return ["forced"]
    if not pipeline.stages[name].cache:
        return ["cache: false"]
    previous = store.last_success(pipeline.display_name, name)
    before = Ingredients.from_json(previous.ingredients_json) if previous and previous.ingredients_json else None
    return explain_miss(before, ingredients) or ["outputs not in the cache"]


@dataclass(frozen=True)
class Prediction:
    stage: str
    will_run: bool
    reasons: tuple[str, ...]


def predict(
    pipeline: Pipeline,
    order: tuple[str, ...],
    store: Store,
    cache: Cache,
    image_ids: Mapping[str, str | None],
    input_digests: Mapping[str, dict[str, str]],
    upstream: Mapping[str, Upstream],
    force: frozenset[str],
) -> list[Prediction]:
    """Which stages would hit the cache and why the others would run; starts nothing, records nothing.
    A stage below one that runs is predicted to run: its upstream outputs are not known until then."""
    digests = {name: up.digest for name, up in upstream.items()}
    predictions = []
    for name in order:
        waiting = [up for up in pipeline.stages[name].needs if up not in digests]
        image_id = image_ids.get(name)
        if waiting:
            reasons = [f"upstream {up} runs first" for up in waiting]
        elif image_id is None:
            reasons = ["image not built yet"]
        else:
            ingredients = ingredients_for(
                pipeline, name, image_id, input_digests[name], {up: digests[up] for up in pipeline.stages[name].needs}
            )
            manifest = None
            if pipeline.stages[name].cache and name not in force:
                manifest = cache.lookup(ingredients.key()).manifest
            if manifest is not None:
                digests[name] = manifest.digest
                predictions.append(Prediction(name, False, (f"cached from run {manifest.run_id}",)))
                continue
            reasons = miss_reasons(pipeline, name, ingredients, store, force)
        predictions.append(Prediction(name, True, tuple(reasons)))
    return predictions
