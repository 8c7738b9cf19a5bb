"""One stage of one run: decision, restore on a hit, container on a miss, outputs saved, metrics, gate.

StageRunner is what parallel.execute calls for every attempt. It is built by api.run_pipeline with the real parts
(cache, executor, history reads) and knows nothing of the CLI, of scheduling, or of writing history.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from orchestrator.cachekey import Ingredients
from orchestrator.decide import WORKDIR, Decision, History, decide
from orchestrator.errors import PipeError
from orchestrator.events import Notice, Reporter, StageOutput, StagePlanned, StageRunning
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

if TYPE_CHECKING:  # cachestore brings objectstore, and so boto3, which a pipeline without a remote never loads
    from orchestrator.cachestore import CacheStore


@dataclass(frozen=True)
class Upstream:
    """Where an upstream stage's outputs are and their content digest (the key uses the digest, not its key);
    `stored`: their tree when it is in the remote's blobs too (a cluster's nodes take it from there), and then
    `path` may not exist on this host (outputs left in the store, --fetch)."""

    path: Path
    digest: str
    stored: TreeDigest | None = None


class StoredOutputs(Protocol):
    """The remote's blobs, where a cluster executor leaves a stage's outputs (cachestore.LayeredCache)."""

    def file(self, key: str, tree: TreeDigest, ingredients: Ingredients, run_id: str, stage: str) -> None:
        """The cache entry of outputs whose blobs are on the remote already: its manifest there."""
        ...

    def has_blobs(self, tree: TreeDigest) -> bool:
        """Whether every blob of the tree is on the remote (a remote hit left there must be whole)."""
        ...

    def download(self, tree: TreeDigest, dest: Path) -> None:
        """The tree's files into dest, verified; PipeError when that cannot be done."""
        ...


def invoking_user() -> str:
    return f"{os.getuid()}:{os.getgid()}"


def container_user(stage_user: str | None) -> str:
    if stage_user is None:
        return invoking_user()
    return "0:0" if stage_user == "root" else stage_user


GateBaseline = Callable[[str, str], "tuple[str, float] | None"]  # (stage, metric) -> (run id, value)


class StageRunner:
    """Runs attempts of the stages of one run and returns their results; writes nothing to history (the
    recorder does, from the events parallel emits). Thread-safe: each call touches only its own stage's folders.

    An attempt: decide (decide.py: the same forecast as dry-run and status) -> restore on a hit, or prepare the
    folders, run the container, check the inputs again, save the outputs -> metrics and gate."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        run_id: str,
        state: StateDir,
        cache: CacheStore,
        executor: Executor,
        reporter: Reporter,
        history: History,
        gate_baseline: GateBaseline,
        image_ids: Mapping[str, str],
        input_digests: Mapping[str, dict[str, str]],
        rehash: Callable[[str], str],
        upstream: dict[str, Upstream],
        secrets: Mapping[str, str],
        force: frozenset[str],
        gate: bool = True,
        stored: StoredOutputs | None = None,
        fetch: Callable[[str], bool] = lambda name: True,
    ) -> None:
        self.pipeline, self.run_id, self.state = pipeline, run_id, state
        self.cache, self.executor, self.reporter, self.history = cache, executor, reporter, history
        self.image_ids, self.input_digests, self.secrets, self.force = image_ids, input_digests, secrets, force
        self._gate_baseline, self._rehash, self._gate = gate_baseline, rehash, gate
        self._upstream = upstream  # grows as stages finish; earlier runs' outputs for --stage
        self._stored, self._fetch = stored, fetch  # stored: None when every output is made on this host
        self._lock = threading.Lock()

    def decide(self, name: str) -> Decision:
        with self._lock:
            upstream: dict[str, str | None] = {
                up: self._upstream[up].digest if up in self._upstream else None
                for up in self.pipeline.stages[name].needs}
        return decide(self.pipeline, name, image_id=self.image_ids[name], inputs=self.input_digests[name],
                      upstream=upstream, force=self.force, cache=self.cache, history=self.history)

    def __call__(self, name: str, attempt: int) -> StageResult:
        decision = self.decide(name)
        assert decision.ingredients is not None, "parallel starts a stage only once its upstreams are done"
        if decision.problem:
            self.reporter.emit(Notice(f"{name}: {decision.problem}; re-running"))
        if decision.manifest is not None:
            return self._restore(name, decision, attempt)
        if attempt == 1:  # a retry is announced by StageRetrying, not as a new plan
            self.reporter.emit(StagePlanned(name, True, decision.reasons))
        return self._run(name, decision.ingredients, attempt, ", ".join(decision.reasons))

    def _run(self, name: str, ingredients: Ingredients, attempt: int, reasons: str) -> StageResult:
        stage = self.pipeline.stages[name]
        key = ingredients.key()
        out = self.state.outputs_dir(self.run_id, name)
        self._prepare(name, out)
        spec = self._container_spec(name, out)
        self.reporter.emit(StageRunning(name, attempt))
        result = self.executor.run(spec, lambda line: self.reporter.emit(StageOutput(name, line)))
        base = StageResult(
            stage=name,
            status=StageStatus.FAILED,
            reason=result.reason,
            exit_code=result.exit_code,
            attempts=attempt,
            infra_error=result.outcome is Outcome.ERROR,
            outcome=result.outcome,
            disk_full=result.disk_full,
            node_lost=result.node_lost,
            cache_key=key,
            image_id=self.image_ids[name],
            started_at=result.started_at,
            finished_at=result.finished_at,
            peak_memory_bytes=result.peak_memory_bytes,
            cpu_seconds=result.cpu_seconds,
            ran_on=result.ran_on,
            warnings=tuple(f"{name}: {w}" for w in result.warnings),
            log_path=str(spec.log_path),
            outputs_path=str(out),
            ingredients_json=ingredients.to_json(),
        )
        for warning in base.warnings:  # never silent: what this executor could not enforce
            self.reporter.emit(Notice(warning))
        if result.outcome is Outcome.CANCELLED:
            remove_outputs(out)  # partial outputs of an interrupted stage are discarded
            return replace(base, status=StageStatus.CANCELLED)
        if result.outcome is not Outcome.SUCCEEDED:
            if result.disk_full:
                remove_outputs(out)  # else history could not record this very failure
            return base  # never cached; left on disk for debugging
        changed = self._changed_inputs(name)
        if changed:
            warning = f"{name}: input {', '.join(changed)} changed while the stage ran; its outputs are not cached"
            self.reporter.emit(Notice(warning))
            base = replace(base, warnings=(*base.warnings, warning), cache_key=None, ingredients_json=None)
        result_ok = self._succeeded(name, base, out, key if stage.cache and not changed else None, ingredients,
                                    result.stored_outputs)
        if result_ok.status is StageStatus.SUCCEEDED and reasons:
            result_ok = replace(result_ok, reason=f"ran: {reasons}")
        return result_ok

    def _changed_inputs(self, name: str) -> list[str]:
        """The declared inputs whose content differs from what the key was computed from (edited mid-run)."""
        return [rel for rel, digest in self.input_digests[name].items() if self._rehash(rel) != digest]

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
            upstream = {up: self._upstream[up] for up in stage.needs}
        mounts = [
            Mount(out, "/outputs", read_only=False),
            Mount(self.state.meta_dir(self.run_id, name), "/pipe"),
            *(Mount(u.path, f"/inputs/{up}", stored=u.stored) for up, u in sorted(upstream.items())),
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
            fetch_outputs=self._stored is None or self._fetch(name),
        )

    def _succeeded(self, name: str, base: StageResult, out: Path, key: str | None, ingredients: Ingredients,
                   stored: TreeDigest | None) -> StageResult:
        """Hash the outputs and save them under `key` (None: not cached), then metrics and gate. Outputs a
        cluster's node stored (`stored`, their tree as the node hashed them) are filed on the remote as they
        are; on this host too when they were fetched, checked against that tree."""
        on_host = stored is None or self._stored is None or self._fetch(name)
        if on_host:
            try:
                tree = hash_tree(out)
            except PipeError as e:  # the stage left a fifo, socket, device or unreadable file: its fault
                return replace(base, reason=f"outputs not stored: {e}")
            if stored is not None and tree.digest != stored.digest:
                return replace(base, infra_error=True, outcome=Outcome.ERROR,
                               reason="the outputs fetched from the store differ from what the node stored")
            if key is not None:
                self.cache.save(key, out, tree, ingredients, self.run_id, name)
        else:
            assert stored is not None
            tree = stored
            remove_outputs(out)  # the empty folder the stage had: absent says "not on this host" (`pipe pull`)
        if key is not None and stored is not None and self._stored is not None:
            self._stored.file(key, tree, ingredients, self.run_id, name)
        result = replace(base, status=StageStatus.SUCCEEDED, reason="", outputs_digest=tree.digest,
                         artifacts=artifacts_of(tree))
        return self._finish_outputs(name, result, out, tree, stored, on_host)

    def _restore(self, name: str, decision: Decision, attempt: int) -> StageResult:
        """Restores a hit through the CacheStore (a remote hit is brought into the local cache first, by decide()
        or here), except a remote hit of a stage whose outputs stay in the store: nothing comes to this host,
        and its downstream stages' nodes take it from the remote's blobs, which are checked to be there (an
        entry with one missing is a miss: the stage runs again)."""
        manifest, ingredients = decision.manifest, decision.ingredients
        assert manifest is not None and ingredients is not None
        tree = manifest.tree
        remote_only = decision.remote is not None and self._stored is not None and not self._fetch(name)
        if remote_only and not self._stored_whole(tree):
            self.reporter.emit(Notice(f"{name}: remote cache entry {manifest.key[:12]} lacks a blob; re-running"))
            self.reporter.emit(StagePlanned(name, True, ("cache entry incomplete",)))
            return self._run(name, ingredients, attempt, "cache entry incomplete")
        self.reporter.emit(StagePlanned(name, False, decision.reasons))
        out = self.state.outputs_dir(self.run_id, name)
        now = datetime.now(UTC)
        remove_outputs(out)
        if not remote_only:
            self.cache.restore(manifest, out)
        result = StageResult(
            stage=name,
            status=StageStatus.CACHED,
            reason=decision.reasons[0],
            attempts=attempt,
            cache_key=manifest.key,
            cached_from=manifest.run_id,
            image_id=self.image_ids[name],
            started_at=now,
            finished_at=datetime.now(UTC),
            outputs_path=str(out),
            outputs_digest=tree.digest,
            artifacts=artifacts_of(tree),
            ingredients_json=ingredients.to_json(),
        )
        stored = tree if decision.remote is not None and self._stored is not None else None
        return self._finish_outputs(name, result, out, tree, stored, on_host=not remote_only)

    def _stored_whole(self, tree: TreeDigest) -> bool:
        assert self._stored is not None
        try:
            return self._stored.has_blobs(tree)
        except PipeError:
            return False

    def _finish_outputs(self, name: str, result: StageResult, out: Path, tree: TreeDigest,
                        stored: TreeDigest | None, on_host: bool) -> StageResult:
        """Metrics and gate, shared by fresh and restored outputs; publishes the outputs to downstream stages.
        Outputs left in the store (not on_host) give their metrics file alone, downloaded to read it."""
        stage = self.pipeline.stages[name]
        if stage.metrics is not None:
            try:
                metrics = self._metrics(out, tree, stage.metrics, on_host)
            except MetricsError as e:
                return replace(result, status=StageStatus.FAILED, reason=str(e))
            result = replace(result, metrics=metrics)
            if stage.gate is not None and not self._gate:
                result = replace(result, warnings=(*result.warnings, f"{name}: gate not checked (--no-gate)"))
            elif stage.gate is not None:
                baseline = self._gate_baseline(name, stage.gate.metric)
                if problem := check_gate(stage.gate, metrics, baseline):
                    return replace(result, status=StageStatus.FAILED, reason=problem, gate_passed=False)
                result = replace(result, gate_passed=True)
        with self._lock:
            self._upstream[name] = Upstream(out, tree.digest, stored)
        return result

    def _metrics(self, out: Path, tree: TreeDigest, rel: str, on_host: bool) -> dict[str, float]:
        if on_host:
            return read_metrics(out, rel)
        assert self._stored is not None
        entry = [e for e in tree.files if e.path == rel and e.link is None]
        with tempfile.TemporaryDirectory(prefix="pipe-metrics-") as tmp:
            try:
                self._stored.download(TreeDigest(tree.digest, tuple(entry)), Path(tmp))
            except PipeError as e:
                raise MetricsError(f"metrics file {rel} could not be read from the store: {e}") from e
            return read_metrics(Path(tmp), rel)


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
    """{stage: {input path: content digest}}; each distinct path is hashed once, unchanged files not read (a
    read-only store's memo writes nothing when flushed)."""
    digests: dict[str, str] = {}
    for name in stages:
        for rel in pipeline.stages[name].inputs:
            if rel not in digests:
                digests[rel] = hash_tree(pipeline.root / rel, memo).digest
    memo.flush()
    return {name: {rel: digests[rel] for rel in pipeline.stages[name].inputs} for name in stages}
