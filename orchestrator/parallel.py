"""Runs the stages of a plan concurrently: ready set, --jobs, cpu/memory budget, fail-fast or keep-going, retries
with backoff, the run deadline and cancellation. Knows nothing of Docker, the database, the cache or networkx.

Contract with `run_stage(stage, attempt) -> StageResult` (api's closure):
- it is called from worker threads, at most `policy.jobs` at a time, with attempt numbers 1, 2, …;
- a FAILED result's failure kind (what `retry_on` matches) is read by `failure_kind` from the result's flags,
  never its text: `node_lost` -> "node_lost" (a cluster node lost mid-attempt; only `retry_on: [node_lost]`
  retries it, the next attempt lands on another node); `infra_error` -> "error"; outcome OOM -> "oom"; outcome
  TIMEOUT -> "timeout"; any other failure -> "error". CANCELLED and SKIPPED results are never retried; a final result after more than one
  attempt says so in its reason ("... (after 3 attempts)");
- a CANCELLED result returned after the run deadline passed is reworded here ("cancelled: run timed out after
  1h00m"), since only execute knows why it cancelled;
- an exception it raises becomes a FAILED result with `infra_error=True` (an EngineError, the engine lost
  mid-stage, included), unless its type is listed in `fatal`: then the run stops and execute re-raises it;
- `on_cancel()` (executor.stop_all) must make running calls return promptly, normally with CANCELLED results.
"""

from __future__ import annotations

import queue
import threading
import time
from bisect import insort
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from orchestrator.errors import PipeError
from orchestrator.events import Reporter, StageFinished, StageRetrying, StageStarted
from orchestrator.executor import Outcome
from orchestrator.results import StageResult, StageStatus
from orchestrator.units import format_duration

POLL_S = 0.05  # how often the main thread looks at `cancel` and the deadline while stages run
_SLACK = 1e-9  # float sums of cpus: 0.1 + 0.2 must fit in 0.3

RunStage = Callable[[str, int], StageResult]  # (stage, attempt number from 1) -> result


@dataclass(frozen=True)
class Demand:
    """What a stage reserves from the host while it runs: its caps, 0 when uncapped (reserves nothing)."""

    cpus: float = 0.0
    memory_bytes: int = 0


@dataclass(frozen=True)
class Capacity:
    """What the host has; the running stages' demands never add up to more (see `execute`)."""

    cpus: float
    memory_bytes: int


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` extra attempts after a failure whose kind is in `retry_on`; waits delay_s, 2*delay_s, 4*delay_s…"""

    retries: int = 0
    delay_s: float = 1.0
    retry_on: frozenset[str] = frozenset({"error"})  # "error", "oom", "timeout", "node_lost"

    def delay_after(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based): exponential backoff."""
        return self.delay_s * 2.0 ** (attempt - 1)


@dataclass(frozen=True)
class Policy:
    jobs: int  # most stages running at once (--jobs)
    keep_going: bool = False  # on a failure, still run every stage that does not depend on it
    deadline_s: float | None = None  # run-level --timeout


@dataclass(frozen=True)
class Execution:
    """What `execute` returns. `cancelled` and `deadline_hit` exclude each other: the first cause wins."""

    results: dict[str, StageResult]  # every stage of `order`, in that order
    cancelled: bool = False  # the caller set `cancel` (SIGINT/SIGTERM) while stages remained
    deadline_hit: bool = False  # policy.deadline_s expired; execute set `cancel` itself

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results.values())


_KINDS = {Outcome.OOM: "oom", Outcome.TIMEOUT: "timeout"}


def failure_kind(result: StageResult) -> str:
    """"error", "oom", "timeout" or "node_lost": what a RetryPolicy's retry_on matches (module docstring)."""
    if result.node_lost:
        return "node_lost"
    if result.infra_error or result.outcome is None:
        return "error"
    return _KINDS.get(result.outcome, "error")


def should_retry(result: StageResult, policy: RetryPolicy, attempt: int) -> bool:
    """Whether failed attempt number `attempt` earns another one."""
    return (
        result.status is StageStatus.FAILED
        and attempt <= policy.retries
        and failure_kind(result) in policy.retry_on
    )


def execute(
    order: Sequence[str],
    needs: Mapping[str, Sequence[str]],
    run_stage: RunStage,
    *,
    policy: Policy,
    capacity: Capacity,
    demands: Mapping[str, Demand],
    retry: Mapping[str, RetryPolicy],
    cancel: threading.Event,
    reporter: Reporter,
    on_cancel: Callable[[], None] = lambda: None,
    fatal: tuple[type[BaseException], ...] = (),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] | None = None,
) -> Execution:
    """Run `order` (topologically sorted) and return a result for every stage in it.

    A stage starts when all its upstreams in `order` finished ok (upstreams outside `order` count as done), in
    `order` order, while fewer than `policy.jobs` run and its `demands` fit beside the running ones in
    `capacity`. A ready stage that does not fit lets later ready stages that do fit start first (the DAG is
    finite, so it cannot starve). A stage whose demand alone exceeds `capacity` (a validation error elsewhere)
    starts when nothing runs and, while it runs, nothing else fits: it runs alone instead of deadlocking.

    A stage's attempts (and the backoff waits between them, `sleep`, by default `cancel.wait`, so a wait ends on
    cancel) run in one worker thread that keeps the stage's slot. The final result's `attempts` counts them.

    After a failure (FAILED, or CANCELLED without a run cancel) nothing new starts and every stage not started
    is SKIPPED "skipped: run stopped after X failed"; with `policy.keep_going` only the stages downstream of X
    are, "skipped: upstream X failed". When `cancel` is set, or the deadline passes (execute then sets `cancel`),
    `on_cancel` is called once, nothing new starts, running stages are waited for, and stages not started are
    SKIPPED "skipped: run cancelled" / "skipped: run timed out after 1h00m". The first cause of a stop names the
    skipped stages. Emits StageStarted per attempt, StageRetrying per wait, StageFinished per final result.
    Raises ValueError if `order` repeats a stage or lists one before its upstream; re-raises a `fatal`
    exception from run_stage once running stages have returned.
    """
    if policy.jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {policy.jobs}")
    return _Run(order, needs, run_stage, policy, capacity, demands, retry, cancel, reporter, on_cancel, fatal,
                clock, sleep or cancel.wait).run()


_NO_RETRY = RetryPolicy()
_NO_DEMAND = Demand()
_VERB = {StageStatus.FAILED: "failed", StageStatus.CANCELLED: "was cancelled", StageStatus.SKIPPED: "was skipped"}


class _Run:
    """One execute call. Scheduling state is touched by the calling thread only; workers report through `_done`."""

    def __init__(self, order: Sequence[str], needs: Mapping[str, Sequence[str]], run_stage: RunStage,
                 policy: Policy, capacity: Capacity, demands: Mapping[str, Demand],
                 retry: Mapping[str, RetryPolicy], cancel: threading.Event, reporter: Reporter,
                 on_cancel: Callable[[], None], fatal: tuple[type[BaseException], ...],
                 clock: Callable[[], float], sleep: Callable[[float], object]) -> None:
        self._order = tuple(order)
        self._index = {stage: i for i, stage in enumerate(self._order)}
        if len(self._index) != len(self._order):
            raise ValueError("order lists a stage twice")
        self._downstream: dict[str, list[str]] = {stage: [] for stage in self._order}
        self._waiting: dict[str, int] = {}  # upstreams in this run not yet finished ok
        for stage in self._order:
            upstream = [up for up in dict.fromkeys(needs.get(stage, ())) if up in self._index]
            for up in upstream:
                if self._index[up] > self._index[stage]:
                    raise ValueError(f"order is not topological: {stage} comes before its upstream {up}")
                self._downstream[up].append(stage)
            self._waiting[stage] = len(upstream)
        self._ready = [i for i, stage in enumerate(self._order) if self._waiting[stage] == 0]  # sorted indices

        self._run_stage, self._policy, self._capacity = run_stage, policy, capacity
        self._demands, self._retry, self._cancel, self._reporter = demands, retry, cancel, reporter
        self._on_cancel, self._fatal_types, self._clock, self._sleep = on_cancel, fatal, clock, sleep
        self._deadline = None if policy.deadline_s is None else clock() + policy.deadline_s
        self._deadline_reason = f"skipped: run timed out after {format_duration(policy.deadline_s or 0)}"

        self._done: queue.Queue[tuple[str, StageResult | BaseException]] = queue.Queue()
        self._running: set[str] = set()
        self._used_cpus, self._used_memory = 0.0, 0
        self._results: dict[str, StageResult] = {}
        self._stop_reason: str | None = None  # once set, nothing new starts
        self._on_cancel_called = False
        self._cancelled = self._deadline_hit = False
        self._fatal: BaseException | None = None

    def run(self) -> Execution:
        with ThreadPoolExecutor(max_workers=self._policy.jobs, thread_name_prefix="pipe-stage") as pool:
            try:
                while True:
                    self._check_cancel()
                    if self._stop_reason is None:
                        self._start_ready(pool)
                    if not self._running:
                        break
                    self._collect()
            except BaseException:
                self._stop_running()  # so that leaving the `with` (which waits for workers) is prompt
                raise
        if self._fatal is not None:
            raise self._fatal
        assert len(self._results) == len(self._order), "a stage was neither run nor skipped"
        return Execution({stage: self._results[stage] for stage in self._order}, self._cancelled,
                         self._deadline_hit)

    def _check_cancel(self) -> None:
        unfinished = len(self._results) < len(self._order)  # a deadline after the last result changes nothing
        if unfinished and self._deadline is not None and not self._cancel.is_set() \
                and self._clock() >= self._deadline:
            self._deadline_hit = True
            self._cancel.set()
        if self._cancel.is_set() and not self._on_cancel_called:
            self._cancelled = not self._deadline_hit
            self._stop(self._deadline_reason if self._deadline_hit else "skipped: run cancelled")
            self._stop_running()

    def _stop_running(self) -> None:
        if not self._on_cancel_called:
            self._on_cancel_called = True
            self._on_cancel()

    def _start_ready(self, pool: ThreadPoolExecutor) -> None:
        i = 0
        while i < len(self._ready) and len(self._running) < self._policy.jobs:
            stage = self._order[self._ready[i]]
            demand = self._demands.get(stage, _NO_DEMAND)
            if not self._fits(demand):
                i += 1
                continue
            del self._ready[i]
            self._running.add(stage)
            self._used_cpus += demand.cpus
            self._used_memory += demand.memory_bytes
            pool.submit(self._work, stage)

    def _fits(self, demand: Demand) -> bool:
        if not self._running:
            return True  # even a demand larger than the host: it runs alone (see execute)
        return (self._used_cpus + demand.cpus <= self._capacity.cpus + _SLACK
                and self._used_memory + demand.memory_bytes <= self._capacity.memory_bytes)

    def _collect(self) -> None:
        """Wait up to a poll interval for a worker, then take every report that is in."""
        timeout = POLL_S
        if self._deadline is not None and not self._cancel.is_set():
            timeout = min(POLL_S, max(0.0, self._deadline - self._clock()))
        try:
            item = self._done.get(timeout=timeout)
            while True:
                self._finish(*item)
                item = self._done.get_nowait()
        except queue.Empty:
            pass

    def _finish(self, stage: str, outcome: StageResult | BaseException) -> None:
        self._running.remove(stage)
        demand = self._demands.get(stage, _NO_DEMAND)
        self._used_cpus -= demand.cpus
        self._used_memory -= demand.memory_bytes
        if not self._running:
            self._used_cpus = 0.0  # no float drift after many additions and subtractions
        if isinstance(outcome, BaseException):
            self._fatal = self._fatal or outcome
            self._stop(f"skipped: run stopped by an internal error in {stage}")
            self._stop_running()
            return
        if self._deadline_hit and outcome.status is StageStatus.CANCELLED:
            outcome = replace(outcome, reason=self._deadline_reason.replace("skipped", "cancelled", 1))
        self._set_result(outcome)
        if outcome.ok:
            for down in self._downstream[stage]:
                self._waiting[down] -= 1
                if self._waiting[down] == 0 and down not in self._results:
                    insort(self._ready, self._index[down])
        elif self._policy.keep_going or outcome.status is StageStatus.SKIPPED:
            self._skip_downstream(stage, f"skipped: upstream {stage} {_VERB[outcome.status]}")
        else:
            self._stop(f"skipped: run stopped after {stage} {_VERB[outcome.status]}")

    def _set_result(self, result: StageResult) -> None:
        self._results[result.stage] = result
        self._reporter.emit(StageFinished(result))

    def _stop(self, reason: str) -> None:
        """Start nothing new; every stage neither started nor finished is skipped with the first reason."""
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        self._ready.clear()
        for stage in self._order:
            if stage not in self._results and stage not in self._running:
                self._set_result(StageResult(stage=stage, status=StageStatus.SKIPPED, reason=reason))

    def _skip_downstream(self, failed: str, reason: str) -> None:
        # None of these can have started: each waits, at least transitively, on `failed`.
        pending = list(self._downstream[failed])
        while pending:
            stage = pending.pop()
            if stage not in self._results:  # one already skipped had its own downstream skipped too
                self._set_result(StageResult(stage=stage, status=StageStatus.SKIPPED, reason=reason))
                pending.extend(self._downstream[stage])

    # Worker threads below: they read only immutable inputs and report through `_done`.

    def _work(self, stage: str) -> None:
        try:
            outcome: StageResult | BaseException = self._attempts(stage)
        except BaseException as exc:  # noqa: BLE001  a `fatal` error or a bug (a failing reporter): run() re-raises it
            outcome = exc
        self._done.put((stage, outcome))

    def _attempts(self, stage: str) -> StageResult:
        policy = self._retry.get(stage, _NO_RETRY)
        attempt = 1
        while True:
            self._reporter.emit(StageStarted(stage, attempt))
            result = self._call(stage, attempt)
            if self._cancel.is_set() or not should_retry(result, policy, attempt):
                break
            delay = policy.delay_after(attempt)
            self._reporter.emit(StageRetrying(stage, attempt + 1, result.reason, delay))
            self._sleep(delay)
            if self._cancel.is_set():
                break  # the last failure stands; the run is stopping
            attempt += 1
        if attempt > 1 and not result.ok:
            result = replace(result, reason=f"{result.reason} (after {attempt} attempts)")
        return replace(result, stage=stage, attempts=attempt)

    def _call(self, stage: str, attempt: int) -> StageResult:
        try:
            return self._run_stage(stage, attempt)
        except self._fatal_types:
            raise
        except PipeError as exc:  # EngineError: the engine was lost mid-stage; its message is already one line
            return StageResult(stage=stage, status=StageStatus.FAILED, infra_error=True, reason=str(exc))
        except Exception as exc:  # noqa: BLE001  one stage's bug must not take the others down
            return StageResult(stage=stage, status=StageStatus.FAILED, infra_error=True,
                               reason=f"internal error: {exc!r}")
