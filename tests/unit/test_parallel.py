"""parallel.execute on fake stages: plain functions and threading primitives, no Docker and no timed assertions."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from orchestrator.errors import EngineError, StoreError
from orchestrator.events import Event, StageFinished, StageRetrying, StageStarted
from orchestrator.executor import Outcome
from orchestrator.parallel import (
    Capacity,
    Demand,
    Execution,
    Policy,
    RetryPolicy,
    execute,
    failure_kind,
)
from orchestrator.results import StageResult, StageStatus

WAIT_S = 10.0  # upper bound for anything that should happen at once; reached only when a test fails
HOST = Capacity(cpus=2.0, memory_bytes=8 * 1024**3)

Behaviour = Callable[[int], StageResult]


def ok(stage: str) -> StageResult:
    return StageResult(stage=stage, status=StageStatus.SUCCEEDED)


def failed(stage: str, reason: str = "exited with code 1", **kwargs: Any) -> StageResult:
    return StageResult(stage=stage, status=StageStatus.FAILED, reason=reason, **kwargs)


class FakeStages:
    """run_stage for execute: runs each stage's behaviour (default: succeed) and records calls and concurrency."""

    def __init__(self, behaviours: Mapping[str, Behaviour] | None = None, linger: bool = False) -> None:
        self.behaviours = dict(behaviours or {})
        self.linger = linger  # each call waits briefly for company, so a missing bound shows as overlap
        self.calls: list[tuple[str, int]] = []
        self.threads: set[str] = set()
        self.running: set[str] = set()
        self.overlaps: set[frozenset[str]] = set()  # pairs of stages seen running at the same time
        self.max_active = 0
        self._cond = threading.Condition()

    def __call__(self, stage: str, attempt: int) -> StageResult:
        with self._cond:
            self.calls.append((stage, attempt))
            self.threads.add(threading.current_thread().name)
            self.overlaps.update(frozenset((stage, other)) for other in self.running)
            self.running.add(stage)
            self.max_active = max(self.max_active, len(self.running))
            self._cond.notify_all()
            if self.linger:
                self._cond.wait_for(lambda: len(self.running) > 1, timeout=0.05)
        try:
            behaviour = self.behaviours.get(stage)
            return behaviour(attempt) if behaviour else ok(stage)
        finally:
            with self._cond:
                self.running.discard(stage)

    @property
    def stages_called(self) -> list[str]:
        return [stage for stage, _ in self.calls]


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, stage: str) -> list[Event]:
        return [e for e in self.events if _stage_of(e) == stage]


def _stage_of(event: Event) -> str | None:
    if isinstance(event, StageFinished):
        return event.result.stage
    return getattr(event, "stage", None)


def run(
    order: Sequence[str],
    needs: Mapping[str, Sequence[str]] | None = None,
    stages: FakeStages | None = None,
    *,
    jobs: int = 2,
    keep_going: bool = False,
    deadline_s: float | None = None,
    capacity: Capacity = HOST,
    demands: Mapping[str, Demand] | None = None,
    retry: Mapping[str, RetryPolicy] | None = None,
    cancel: threading.Event | None = None,
    reporter: Recorder | None = None,
    **kwargs: Any,
) -> Execution:
    return execute(
        order,
        needs or {},
        stages or FakeStages(),
        policy=Policy(jobs=jobs, keep_going=keep_going, deadline_s=deadline_s),
        capacity=capacity,
        demands=demands or {},
        retry=retry or {},
        cancel=cancel or threading.Event(),
        reporter=reporter or Recorder(),
        **kwargs,
    )


def statuses(execution: Execution) -> dict[str, str]:
    return {stage: str(result.status) for stage, result in execution.results.items()}


# Order and readiness


def test_stages_start_in_plan_order_when_serialised() -> None:
    stages = FakeStages()
    execution = run(["c", "a", "b", "d"], {"d": ["a"]}, stages, jobs=1)
    assert stages.stages_called == ["c", "a", "b", "d"]
    assert list(execution.results) == ["c", "a", "b", "d"]
    assert execution.ok and not execution.cancelled and not execution.deadline_hit


def test_downstream_starts_only_after_all_upstreams_finished() -> None:
    finished: set[str] = set()
    seen_at_start: dict[str, set[str]] = {}

    def body(stage: str) -> Behaviour:
        def behaviour(attempt: int) -> StageResult:
            seen_at_start[stage] = set(finished)
            finished.add(stage)
            return ok(stage)
        return behaviour

    order = ["a", "b", "c", "d"]
    run(order, {"c": ["a", "b"], "d": ["c"]}, FakeStages({s: body(s) for s in order}), jobs=4)
    assert {"a", "b"} <= seen_at_start["c"]
    assert "c" in seen_at_start["d"]


def test_upstream_outside_the_run_counts_as_done() -> None:
    execution = run(["train"], {"train": ["data"]})
    assert execution.results["train"].status is StageStatus.SUCCEEDED


def test_cached_upstream_lets_downstream_run() -> None:
    stages = FakeStages({"data": lambda _: StageResult(stage="data", status=StageStatus.CACHED)})
    execution = run(["data", "train"], {"train": ["data"]}, stages)
    assert statuses(execution) == {"data": "cached", "train": "succeeded"}


def test_order_that_is_not_topological_is_refused() -> None:
    with pytest.raises(ValueError, match="train comes before its upstream data"):
        run(["train", "data"], {"train": ["data"]})


def test_order_listing_a_stage_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        run(["a", "a"])


# Concurrency bounds


def test_independent_stages_overlap_with_two_jobs() -> None:
    barrier = threading.Barrier(2, timeout=WAIT_S)  # breaks, failing both stages, unless both run at once

    def meet(stage: str) -> Behaviour:
        def behaviour(attempt: int) -> StageResult:
            barrier.wait()
            return ok(stage)
        return behaviour

    execution = run(["a", "b"], stages=FakeStages({"a": meet("a"), "b": meet("b")}), jobs=2)
    assert statuses(execution) == {"a": "succeeded", "b": "succeeded"}


def test_one_job_serialises() -> None:
    stages = FakeStages(linger=True)
    execution = run(["a", "b", "c", "d"], stages=stages, jobs=1)
    assert execution.ok
    assert stages.max_active == 1


def test_jobs_bounds_concurrency_and_threads() -> None:
    stages = FakeStages(linger=True)
    execution = run([f"s{i}" for i in range(20)], stages=stages, jobs=3)
    assert execution.ok
    assert stages.max_active <= 3
    assert len(stages.threads) <= 3


def test_cpu_budget_keeps_two_big_stages_apart() -> None:
    stages = FakeStages(linger=True)
    big = Demand(cpus=1.5, memory_bytes=0)
    execution = run(["a", "b"], stages=stages, jobs=2, capacity=Capacity(2.0, 8 * 1024**3),
                    demands={"a": big, "b": big})
    assert execution.ok
    assert stages.max_active == 1


def test_stages_that_fit_the_budget_together_overlap() -> None:
    barrier = threading.Barrier(2, timeout=WAIT_S)

    def meet(stage: str) -> Behaviour:
        def behaviour(attempt: int) -> StageResult:
            barrier.wait()
            return ok(stage)
        return behaviour

    half = Demand(cpus=1.0, memory_bytes=4 * 1024**3)
    execution = run(["a", "b"], stages=FakeStages({"a": meet("a"), "b": meet("b")}), jobs=2,
                    capacity=Capacity(2.0, 8 * 1024**3), demands={"a": half, "b": half})
    assert execution.ok


def test_memory_budget_keeps_two_big_stages_apart() -> None:
    stages = FakeStages(linger=True)
    big = Demand(cpus=0.0, memory_bytes=5 * 1024**3)
    execution = run(["a", "b", "c"], stages=stages, jobs=3, capacity=Capacity(4.0, 8 * 1024**3),
                    demands={"a": big, "b": big, "c": big})
    assert execution.ok
    assert stages.max_active == 1


def test_small_stage_starts_beside_a_big_one_when_a_bigger_one_waits() -> None:
    barrier = threading.Barrier(2, timeout=WAIT_S)  # "big" and "small" must run together

    def meet(stage: str) -> Behaviour:
        def behaviour(attempt: int) -> StageResult:
            barrier.wait()
            return ok(stage)
        return behaviour

    stages = FakeStages({"big": meet("big"), "small": meet("small")})
    execution = run(["big", "bigger", "small"], stages=stages, jobs=3, capacity=Capacity(2.0, 8 * 1024**3),
                    demands={"big": Demand(1.5, 0), "bigger": Demand(1.0, 0), "small": Demand(0.5, 0)})
    assert execution.ok
    assert stages.stages_called.index("bigger") > stages.stages_called.index("small")


def test_stage_larger_than_the_host_runs_alone_instead_of_deadlocking() -> None:
    stages = FakeStages(linger=True)
    execution = run(["huge", "a", "b"], stages=stages, jobs=3, capacity=Capacity(2.0, 1024**3),
                    demands={"huge": Demand(8.0, 0), "a": Demand(0.0, 0), "b": Demand(0.0, 0)})
    assert execution.ok
    assert stages.stages_called[0] == "huge"
    assert not any("huge" in pair for pair in stages.overlaps)


def test_wide_dag_of_a_thousand_stages_with_two_jobs() -> None:
    stages = FakeStages()
    wide = [f"s{i:04d}" for i in range(1000)]
    order = ["root", *wide, "sink"]
    needs = {**{s: ["root"] for s in wide}, "sink": wide}
    execution = run(order, needs, stages, jobs=2)
    assert execution.ok
    assert len(execution.results) == 1002
    assert stages.stages_called[0] == "root" and stages.stages_called[-1] == "sink"
    assert stages.max_active <= 2 and len(stages.threads) <= 2


# Failure policy


def test_failure_stops_new_starts_and_skips_the_rest() -> None:
    stages = FakeStages({"b": lambda _: failed("b")})
    execution = run(["a", "b", "c", "d"], {"d": ["a"]}, stages, jobs=1)
    assert stages.stages_called == ["a", "b"]
    assert statuses(execution) == {"a": "succeeded", "b": "failed", "c": "skipped", "d": "skipped"}
    assert execution.results["c"].reason == "skipped: run stopped after b failed"
    assert not execution.ok


def test_running_stage_finishes_after_another_fails() -> None:
    a_failed = threading.Event()

    def slow(attempt: int) -> StageResult:
        assert a_failed.wait(WAIT_S)
        return ok("b")

    def fail(attempt: int) -> StageResult:
        a_failed.set()
        return failed("a")

    stages = FakeStages({"a": fail, "b": slow})
    execution = run(["a", "b", "c"], stages=stages, jobs=2)
    assert statuses(execution) == {"a": "failed", "b": "succeeded", "c": "skipped"}
    assert "c" not in stages.stages_called


def test_keep_going_runs_independent_branches_and_skips_downstream() -> None:
    stages = FakeStages({"a": lambda _: failed("a")})
    needs = {"b": ["a"], "c": ["b"], "e": ["d"], "f": ["b", "e"]}
    execution = run(["a", "d", "b", "e", "c", "f"], needs, stages, jobs=1, keep_going=True)
    assert statuses(execution) == {"a": "failed", "d": "succeeded", "b": "skipped", "e": "succeeded",
                                   "c": "skipped", "f": "skipped"}
    assert {execution.results[s].reason for s in "bcf"} == {"skipped: upstream a failed"}
    assert sorted(stages.stages_called) == ["a", "d", "e"]


# Retries


def test_retries_back_off_exponentially_and_count_attempts() -> None:
    delays: list[float] = []
    reporter = Recorder()
    stages = FakeStages({"train": lambda attempt: failed("train", f"exited with code {attempt}")})
    execution = run(["train"], stages=stages, retry={"train": RetryPolicy(retries=3, delay_s=1.0)},
                    reporter=reporter, sleep=delays.append)
    assert delays == [1.0, 2.0, 4.0]
    assert stages.calls == [("train", 1), ("train", 2), ("train", 3), ("train", 4)]
    result = execution.results["train"]
    assert result.status is StageStatus.FAILED and result.attempts == 4
    assert result.reason == "exited with code 4 (after 4 attempts)"
    retrying = [e for e in reporter.events if isinstance(e, StageRetrying)]
    assert [(e.attempt, e.delay_s, e.reason) for e in retrying] == [
        (2, 1.0, "exited with code 1"), (3, 2.0, "exited with code 2"), (4, 4.0, "exited with code 3")]


def test_retry_that_succeeds_stops_retrying() -> None:
    stages = FakeStages({"train": lambda attempt: failed("train") if attempt < 2 else ok("train")})
    execution = run(["train", "eval"], {"eval": ["train"]}, stages,
                    retry={"train": RetryPolicy(retries=5, delay_s=0.5)}, sleep=lambda _: None)
    assert statuses(execution) == {"train": "succeeded", "eval": "succeeded"}
    assert execution.results["train"].attempts == 2
    assert execution.results["eval"].attempts == 1


@pytest.mark.parametrize("reason, outcome, kind", [
    ("killed: out of memory (cap 256 MiB)", Outcome.OOM, "oom"),
    ("timed out after 20m00s", Outcome.TIMEOUT, "timeout"),
])
def test_oom_and_timeout_are_retried_only_when_asked(reason: str, outcome: Outcome, kind: str) -> None:
    def stages() -> FakeStages:
        return FakeStages({"train": lambda _: failed("train", reason, outcome=outcome)})

    default = run(["train"], stages=stages(), retry={"train": RetryPolicy(retries=2)}, sleep=lambda _: None)
    assert default.results["train"].attempts == 1
    asked = run(["train"], stages=stages(), retry={"train": RetryPolicy(retries=2, retry_on=frozenset({kind}))},
                sleep=lambda _: None)
    assert asked.results["train"].attempts == 3


def test_failure_kind_reads_the_outcome_never_the_text() -> None:
    assert failure_kind(failed("s", "killed: out of memory (cap 1 GiB)", outcome=Outcome.OOM)) == "oom"
    assert failure_kind(failed("s", "timed out after 1m00s", outcome=Outcome.TIMEOUT)) == "timeout"
    assert failure_kind(failed("s", "exited with code 2", outcome=Outcome.FAILED)) == "error"
    assert failure_kind(failed("s", "timed out", outcome=Outcome.TIMEOUT, infra_error=True)) == "error"
    # the words alone decide nothing: a stage may print anything into a reason
    assert failure_kind(failed("s", "timed out waiting for the GPU", outcome=Outcome.FAILED)) == "error"
    assert failure_kind(failed("s", "killed: out of memory", outcome=Outcome.FAILED)) == "error"
    lost = failed("s", "node pipe-n3 lost (down) while the task ran", outcome=Outcome.ERROR, infra_error=True,
                  node_lost=True)
    assert failure_kind(lost) == "node_lost"
    assert failure_kind(failed("s", "node pipe-n3 lost (down)", outcome=Outcome.ERROR, infra_error=True)) == "error"


def test_a_lost_node_is_retried_only_when_retry_on_names_node_lost() -> None:
    def lost_then_ok(attempt: int) -> StageResult:
        if attempt == 1:
            return failed("train", "node pipe-n3 lost (down) while the task ran", outcome=Outcome.ERROR,
                          infra_error=True, node_lost=True)
        return StageResult(stage="train", status=StageStatus.SUCCEEDED)

    on_error = run(["train"], stages=FakeStages({"train": lost_then_ok}),
                   retry={"train": RetryPolicy(retries=1)}, sleep=lambda _: None)
    assert (on_error.results["train"].status, on_error.results["train"].attempts) == (StageStatus.FAILED, 1)
    asked = run(["train"], stages=FakeStages({"train": lost_then_ok}),
                retry={"train": RetryPolicy(retries=1, retry_on=frozenset({"node_lost"}))}, sleep=lambda _: None)
    assert (asked.results["train"].status, asked.results["train"].attempts) == (StageStatus.SUCCEEDED, 2)


def test_a_failure_after_retries_says_how_many_attempts() -> None:
    stages = FakeStages({"train": lambda _: failed("train", "exited with code 1", outcome=Outcome.FAILED)})
    execution = run(["train"], stages=stages, retry={"train": RetryPolicy(retries=2)}, sleep=lambda _: None)
    assert execution.results["train"].reason == "exited with code 1 (after 3 attempts)"
    once = run(["train"], stages=FakeStages({"train": lambda _: failed("train")}), sleep=lambda _: None)
    assert once.results["train"].reason == "exited with code 1"


@pytest.mark.parametrize("status", [StageStatus.CANCELLED, StageStatus.SKIPPED])
def test_cancelled_and_skipped_results_are_never_retried(status: StageStatus) -> None:
    stages = FakeStages({"a": lambda _: StageResult(stage="a", status=status)})
    execution = run(["a", "b"], {"b": ["a"]}, stages, retry={"a": RetryPolicy(retries=3)}, sleep=lambda _: None)
    assert execution.results["a"].attempts == 1
    assert stages.calls == [("a", 1)]
    assert execution.results["b"].status is StageStatus.SKIPPED


def test_cancel_during_backoff_ends_the_wait() -> None:
    cancel = threading.Event()

    class CancelWhileWaiting(Recorder):
        def emit(self, event: Event) -> None:
            super().emit(event)
            if isinstance(event, StageRetrying):
                threading.Timer(0.01, cancel.set).start()  # SIGINT during the hour-long backoff

    box: list[Execution] = []
    worker = threading.Thread(target=lambda: box.append(run(
        ["train", "eval"], {"eval": ["train"]}, FakeStages({"train": lambda _: failed("train")}), cancel=cancel,
        retry={"train": RetryPolicy(retries=3, delay_s=3600.0)}, reporter=CancelWhileWaiting())))
    worker.start()
    worker.join(WAIT_S)
    assert not worker.is_alive()
    assert box[0].results["train"].status is StageStatus.FAILED
    assert box[0].results["train"].attempts == 1
    assert box[0].results["eval"].status is StageStatus.SKIPPED
    assert box[0].cancelled


# Exceptions


def test_exception_becomes_an_infrastructure_failure() -> None:
    def boom(attempt: int) -> StageResult:
        raise RuntimeError("disk on fire")

    execution = run(["a", "b"], {"b": ["a"]}, FakeStages({"a": boom}))
    result = execution.results["a"]
    assert result.status is StageStatus.FAILED and result.infra_error and result.attempts == 1
    assert result.reason == "internal error: RuntimeError('disk on fire')"
    assert execution.results["b"].status is StageStatus.SKIPPED


def test_engine_lost_mid_stage_is_an_infrastructure_failure_and_retryable() -> None:
    def lost(attempt: int) -> StageResult:
        if attempt == 1:
            raise EngineError("docker engine at /var/run/docker.sock went away")
        return ok("a")

    execution = run(["a"], stages=FakeStages({"a": lost}), retry={"a": RetryPolicy(retries=1)},
                    sleep=lambda _: None)
    assert execution.results["a"].status is StageStatus.SUCCEEDED
    assert execution.results["a"].attempts == 2

    once = run(["a"], stages=FakeStages({"a": lost}))
    assert once.results["a"].infra_error
    assert once.results["a"].reason == "docker engine at /var/run/docker.sock went away"


def test_fatal_error_stops_the_run_and_is_raised_after_running_stages_return() -> None:
    stopped = threading.Event()
    b_returned = threading.Event()
    stop_calls: list[int] = []

    def on_cancel() -> None:
        stop_calls.append(1)
        stopped.set()

    def store_broken(attempt: int) -> StageResult:
        raise StoreError("cannot write runs/pipe.db: disk full")

    def stopped_by_executor(attempt: int) -> StageResult:
        assert stopped.wait(WAIT_S)
        b_returned.set()
        return StageResult(stage="b", status=StageStatus.CANCELLED)

    stages = FakeStages({"a": store_broken, "b": stopped_by_executor})
    with pytest.raises(StoreError, match="disk full"):
        run(["a", "b", "c"], stages=stages, jobs=2, fatal=(StoreError,), on_cancel=on_cancel)
    assert b_returned.is_set()
    assert sorted(stages.stages_called) == ["a", "b"]
    assert stop_calls == [1]


# Cancellation and the deadline


def test_cancel_mid_run_stops_running_stages_once_and_skips_the_rest() -> None:
    cancel = threading.Event()
    stopped = threading.Event()
    stop_calls: list[int] = []

    def on_cancel() -> None:
        stop_calls.append(1)
        stopped.set()

    def interrupted(attempt: int) -> StageResult:
        cancel.set()  # SIGINT arrives while this stage runs
        assert stopped.wait(WAIT_S)  # the executor's stop_all ends the container
        return StageResult(stage="train", status=StageStatus.CANCELLED, reason="cancelled")

    reporter = Recorder()
    stages = FakeStages({"train": interrupted})
    execution = run(["data", "train", "eval", "other"], {"train": ["data"], "eval": ["train"]}, stages,
                    jobs=1, cancel=cancel, on_cancel=on_cancel, reporter=reporter,
                    retry={"train": RetryPolicy(retries=3)})
    assert stop_calls == [1]
    assert stages.stages_called == ["data", "train"]
    assert statuses(execution) == {"data": "succeeded", "train": "cancelled", "eval": "skipped",
                                   "other": "skipped"}
    assert execution.results["eval"].reason == "skipped: run cancelled"
    assert execution.cancelled and not execution.deadline_hit
    assert [e.result.stage for e in reporter.events if isinstance(e, StageFinished)].count("eval") == 1


def test_cancel_before_start_runs_nothing() -> None:
    cancel = threading.Event()
    cancel.set()
    stop_calls: list[int] = []
    stages = FakeStages()
    execution = run(["a", "b"], stages=stages, cancel=cancel, on_cancel=lambda: stop_calls.append(1))
    assert stages.calls == []
    assert statuses(execution) == {"a": "skipped", "b": "skipped"}
    assert stop_calls == [1]


def test_deadline_cancels_the_run_and_names_the_timeout() -> None:
    now = [1000.0]
    cancel = threading.Event()
    stopped = threading.Event()

    def long_stage(attempt: int) -> StageResult:
        now[0] += 3600.0  # an hour passes on the injected clock
        assert stopped.wait(WAIT_S)
        return StageResult(stage="train", status=StageStatus.CANCELLED, reason="cancelled")

    execution = run(["train", "eval"], {"eval": ["train"]}, FakeStages({"train": long_stage}), jobs=1,
                    deadline_s=3600.0, cancel=cancel, on_cancel=stopped.set, clock=lambda: now[0])
    assert cancel.is_set()
    assert execution.deadline_hit and not execution.cancelled
    assert statuses(execution) == {"train": "cancelled", "eval": "skipped"}
    assert execution.results["eval"].reason == "skipped: run timed out after 1h00m"
    assert execution.results["train"].reason == "cancelled: run timed out after 1h00m"  # reworded where known


def test_failure_before_cancel_names_the_failure_in_skips() -> None:
    cancel = threading.Event()
    a_done = threading.Event()

    def fail(attempt: int) -> StageResult:
        a_done.set()
        return failed("a")

    def slow(attempt: int) -> StageResult:
        assert a_done.wait(WAIT_S)
        return ok("b")

    execution = run(["a", "b", "c"], stages=FakeStages({"a": fail, "b": slow}), jobs=2, cancel=cancel)
    assert execution.results["c"].reason == "skipped: run stopped after a failed"


# Events


def test_events_for_every_attempt_and_every_final_result() -> None:
    reporter = Recorder()
    stages = FakeStages({"a": lambda attempt: failed("a") if attempt == 1 else ok("a"),
                         "b": lambda _: failed("b")})
    run(["a", "b", "c"], {"c": ["b"]}, stages, jobs=1, keep_going=True, reporter=reporter,
        retry={"a": RetryPolicy(retries=1, delay_s=2.0)}, sleep=lambda _: None)
    assert reporter.of("a") == [
        StageStarted("a", 1),
        StageRetrying("a", 2, "exited with code 1", 2.0),
        StageStarted("a", 2),
        StageFinished(StageResult(stage="a", status=StageStatus.SUCCEEDED, attempts=2)),
    ]
    assert reporter.of("b") == [StageStarted("b", 1), StageFinished(failed("b", attempts=1))]
    assert reporter.of("c") == [StageFinished(StageResult(stage="c", status=StageStatus.SKIPPED,
                                                          reason="skipped: upstream b failed"))]
