"""The foreground loop of `pipe scheduler` (crontab.py installs lines for cron instead).

Knows nothing of Docker or the database: it is given callables that load, run and record. Fire times come from
cron.py; this module adds time passing, one worker thread per running pipeline, and the overlap policies.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, NamedTuple

from orchestrator import cron
from orchestrator.cron import TRIGGER, iso
from orchestrator.errors import ExitCode, LockHeld, PipeError, UsageError
from orchestrator.spec import Pipeline
from orchestrator.store.records import TickAction

log = logging.getLogger(__name__)


class RunOutcome(NamedTuple):
    run_id: str | None  # None when the run ended before it got an id (an invalid file, say)
    exit_code: int


# (pipeline file, trigger, cancel) -> outcome. Runs on a worker thread; may raise; once `cancel` is set it
# stops its containers and returns soon (a cancelled run, exit 130).
RunPipeline = Callable[[Path, str, threading.Event], RunOutcome]
SUCCEEDED = "the run succeeded"  # the reason recorded with a tick whose run exited 0

# (pipeline name, due_at, action, reason, run id): Store.record_tick
RecordTick = Callable[[str, datetime, TickAction, str, str | None], None]


@dataclass
class _Job:
    due_at: datetime
    cancel: threading.Event
    thread: threading.Thread
    cancel_reason: str | None = None


@dataclass
class _Entry:
    path: Path
    pipeline: Pipeline  # the last valid version of the file
    seen: tuple[int, int, int] | None  # (mtime_ns, size, inode) when last looked at; None: unreadable
    cursor: datetime | None  # ticks up to here are accounted for
    job: _Job | None = None
    queued: datetime | None = None  # the tick that runs when the job ends (overlap: queue, cancel-running)


@dataclass(frozen=True)
class _Finished:
    path: Path
    outcome: RunOutcome | None
    error: Exception | None


class Scheduler:
    """Fires scheduled runs of some pipelines until `stop` is set.

    Reading order: run_forever → step (reload changed files → collect finished runs → due ticks → overlap
    policy → start a worker) → shut_down. Every tick ends in exactly one `record_tick` call, always made on
    the thread that calls step, so history accounts for each one: fired (when its run returns), skipped or
    coalesced. A run that fails or raises is logged and recorded; the loop goes on. A file that becomes
    invalid logs its SpecError and keeps its previous schedule.
    """

    def __init__(
        self,
        pipelines: Sequence[Path],
        *,
        load: Callable[[Path], Pipeline],
        run: RunPipeline,
        record_tick: RecordTick,
        last_tick: Callable[[str], datetime | None],
        clock: Callable[[], datetime],
        stop: threading.Event,
        on_stop: Literal["finish", "cancel"] = "finish",
        wait: Callable[[float], object] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        """Loads every file now: SpecError, or UsageError for a file without `schedule:`, propagates."""
        self._load, self._run, self._record_tick, self._clock = load, run, record_tick, clock
        self._stop, self._on_stop, self._poll_s = stop, on_stop, poll_s
        self._wait = wait if wait is not None else stop.wait
        self._done: queue.SimpleQueue[_Finished] = queue.SimpleQueue()
        self._entries: dict[Path, _Entry] = {}
        names: dict[str, Path] = {}
        for path in pipelines:
            seen = _identity(path)
            pipeline = load(path)
            if pipeline.schedule is None:
                raise UsageError(f"{path} has no `schedule:`; add one (cron:, timezone:) to run it with "
                                 "`pipe scheduler`")
            if (other := names.setdefault(pipeline.display_name, path)) != path:
                raise UsageError(f"{other} and {path} are both named {pipeline.display_name!r}; set `name:`")
            self._entries[path] = _Entry(path, pipeline, seen, last_tick(pipeline.display_name))

    def run_forever(self) -> None:
        """Step until `stop` is set, then finish or cancel the running runs (`on_stop`) and return."""
        for entry in self._entries.values():
            log.info("%s: scheduled %r in %s", entry.pipeline.display_name, *_cron_and_zone(entry.pipeline))
        while not self._stop.is_set():
            self._wait(self.step())
        self.shut_down()

    def step(self) -> float:
        """One pass; returns how long to wait before the next (at most poll_s)."""
        now = self._clock()
        self._collect()
        for entry in self._entries.values():
            self._reload_if_changed(entry)
            schedule = entry.pipeline.schedule
            if schedule is not None:
                for tick in cron.due_ticks(schedule, entry.cursor, now).ticks:
                    if tick.decision == "fire":
                        self._fire(entry, tick.due_at)
                    else:
                        self._record(entry, tick.due_at, "skipped" if tick.decision == "skip" else "coalesced",
                                     tick.reason or "")
            # max: a clock set back does not fire a tick twice
            entry.cursor = max(now, entry.cursor) if entry.cursor else now
        upcoming = [cron.next_fire_times(e.pipeline.schedule, now, 1)[0] - now
                    for e in self._entries.values() if e.pipeline.schedule is not None]
        return max(0.0, min([self._poll_s, *(d.total_seconds() for d in upcoming)]))

    def shut_down(self) -> None:
        """Records queued ticks as skipped, finishes or cancels the running runs, and records them."""
        for entry in self._entries.values():
            if entry.queued is not None:
                self._record(entry, entry.queued, "skipped",
                             "the scheduler stopped before the queued run started")
                entry.queued = None
            if entry.job is not None and self._on_stop == "cancel":
                self._cancel(entry.job, "cancelled: the scheduler stopped (on_stop: cancel)")
        for entry in self._entries.values():
            if entry.job is not None:
                log.info("%s: waiting for the run of the tick at %s", entry.pipeline.display_name,
                         iso(entry.job.due_at))
                entry.job.thread.join()
        self._collect()

    def _fire(self, entry: _Entry, due_at: datetime) -> None:
        job, schedule = entry.job, entry.pipeline.schedule
        assert schedule is not None
        if job is not None and not job.thread.is_alive():  # ended since _collect: its result is queued
            self._collect()
            job = entry.job
        if job is None:
            self._start(entry, due_at)
        elif schedule.overlap == "skip":
            self._record(entry, due_at, "skipped",
                         f"previous run (tick at {iso(job.due_at)}) still running (overlap: skip)")
        elif schedule.overlap == "queue" and entry.queued is not None:
            self._record(entry, due_at, "coalesced", f"coalesced into the queued run for the tick at "
                                                     f"{iso(entry.queued)} (overlap: queue)")
        else:  # queue, or cancel-running: the new run starts once the old one has ended and released its lock
            if schedule.overlap == "cancel-running":
                self._cancel(job, f"cancelled by the tick at {iso(due_at)} (overlap: cancel-running)")
                if entry.queued is not None:
                    self._record(entry, entry.queued, "coalesced", f"coalesced into the run for the tick at "
                                                                   f"{iso(due_at)} (overlap: cancel-running)")
            entry.queued = due_at
            log.info("%s: tick at %s waits for the running run (overlap: %s)", entry.pipeline.display_name,
                     iso(due_at), schedule.overlap)

    def _start(self, entry: _Entry, due_at: datetime) -> None:
        cancel = threading.Event()
        thread = threading.Thread(target=self._work, args=(entry.path, cancel), daemon=True,
                                  name=f"pipe-scheduled-{entry.pipeline.display_name}")
        entry.job = _Job(due_at, cancel, thread)
        log.info("%s: firing the tick at %s", entry.pipeline.display_name, iso(due_at))
        thread.start()

    def _work(self, path: Path, cancel: threading.Event) -> None:
        outcome: RunOutcome | None = None
        error: Exception | None = None
        try:
            outcome = self._run(path, TRIGGER, cancel)
        except PipeError as e:
            error = e
        except Exception as e:
            log.exception("%s: the scheduled run raised", path)
            error = e
        finally:  # whatever happens, the job must end, or this pipeline would never fire again
            self._done.put(_Finished(path, outcome, error))

    def _collect(self) -> None:
        """Records every run that ended and starts the tick queued behind it (shut_down empties the queue)."""
        while True:
            try:
                finished = self._done.get_nowait()
            except queue.Empty:
                return
            entry = self._entries[finished.path]
            job = entry.job
            assert job is not None
            job.thread.join()
            entry.job = None
            status, reason = _judge(finished, job.cancel_reason)
            name = entry.pipeline.display_name
            if status == "fired" and reason != SUCCEEDED:
                log.warning("%s: tick at %s: %s", name, iso(job.due_at), reason)
            run_id = finished.outcome.run_id if finished.outcome is not None else None
            self._record(entry, job.due_at, status, reason, run_id)
            if entry.queued is not None:
                due_at, entry.queued = entry.queued, None
                self._start(entry, due_at)

    def _reload_if_changed(self, entry: _Entry) -> None:
        seen = _identity(entry.path)
        if seen == entry.seen:
            return
        entry.seen = seen
        name = entry.pipeline.display_name
        if seen is None:
            log.error("%s: cannot read %s; keeping the previous schedule", name, entry.path)
            return
        try:
            pipeline = self._load(entry.path)
        except (PipeError, OSError) as e:
            log.error("%s; keeping the previous schedule", e)
            return
        entry.pipeline = pipeline
        if pipeline.schedule is None:
            log.warning("%s: %s has no `schedule:` any more; nothing fires until it has one",
                        name, entry.path)
        else:
            log.info("%s: reloaded %s: %r in %s", name, entry.path, *_cron_and_zone(pipeline))

    def _cancel(self, job: _Job, reason: str) -> None:
        if job.cancel_reason is None:
            job.cancel_reason = reason
            job.cancel.set()

    def _record(self, entry: _Entry, due_at: datetime, action: TickAction, reason: str,
                run_id: str | None = None) -> None:
        name = entry.pipeline.display_name
        if action != "fired":
            log.info("%s: tick at %s %s: %s", name, iso(due_at), action, reason)
        try:
            self._record_tick(name, due_at, action, reason, run_id)
        except Exception:  # a history that cannot be written must not stop the schedule
            log.exception("%s: could not record the tick at %s", name, iso(due_at))


def _judge(finished: _Finished, cancel_reason: str | None) -> tuple[TickAction, str]:
    """How a run that ended goes into history: a lock held by another run means this tick was skipped."""
    if isinstance(finished.error, LockHeld):
        return "skipped", str(finished.error)
    if finished.error is not None:
        return "fired", f"the run raised: {str(finished.error) or type(finished.error).__name__}"
    if finished.outcome is None:
        return "fired", "the run ended without an exit code"
    code = finished.outcome.exit_code
    if code == ExitCode.LOCKED:
        return "skipped", "another run of this pipeline holds its lock"
    if cancel_reason is not None:
        return "fired", f"{cancel_reason}; exit code {code}"
    return "fired", SUCCEEDED if code == 0 else f"the run failed (exit code {code})"


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _cron_and_zone(pipeline: Pipeline) -> tuple[str, str]:
    assert pipeline.schedule is not None
    return pipeline.schedule.cron, pipeline.schedule.timezone
