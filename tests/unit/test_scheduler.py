"""The scheduler loop with a fake clock and fake runs over real pipeline files; crontab install/uninstall."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest

from orchestrator.cron import MISSED, crontab_line, crontab_marker
from orchestrator.crontab import (
    CrontabError,
    install_crontab,
    read_crontab,
    system_timezone,
    uninstall_crontab,
)
from orchestrator.errors import LockHeld, SpecError, UsageError
from orchestrator.loader import load_pipeline
from orchestrator.scheduler import SUCCEEDED, RunOutcome, Scheduler
from orchestrator.spec import Schedule

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
DEADLINE_S = 5.0


def minute(n: int, second: int = 0) -> datetime:
    return T0 + timedelta(minutes=n, seconds=second)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeRun:
    """A run callable that records its calls, then ends the way the next item of `script` says.

    Script items: an exit code, or an exception to raise. With `hold`, a call waits for `release` (or for its
    cancel event: then it returns exit 130, as a cancelled `pipe run` does).
    """

    def __init__(self, *script: int | Exception, hold: bool = False) -> None:
        self.script = list(script) or [0]
        self.calls: list[tuple[Path, str]] = []
        self.cancels: list[threading.Event] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self._lock = threading.Lock()

    def __call__(self, path: Path, trigger: str, cancel: threading.Event) -> RunOutcome:
        with self._lock:
            n = len(self.calls)
            self.calls.append((path, trigger))
            self.cancels.append(cancel)
        while not (self.release.is_set() or cancel.is_set()):
            self.release.wait(0.002)
        if cancel.is_set():
            return RunOutcome(f"run-{n + 1}", 130)
        step = self.script[min(n, len(self.script) - 1)]
        if isinstance(step, Exception):
            raise step
        return RunOutcome(f"run-{n + 1}", step)


Record = tuple[str, datetime, str, str, "str | None"]


class Harness:
    def __init__(self, tmp_path: Path, run: FakeRun, *, last: datetime | None = None, start: datetime = T0,
                 on_stop: Literal["finish", "cancel"] = "finish", **schedule: Any) -> None:
        self.path = tmp_path / "pipeline.yaml"
        write_pipeline(self.path, **schedule)
        self.clock, self.run, self.stop = FakeClock(start), run, threading.Event()
        self.records: list[Record] = []
        self.scheduler = Scheduler(
            [self.path], load=load_pipeline, run=run, record_tick=self.record, last_tick=lambda name: last,
            clock=self.clock, stop=self.stop, on_stop=on_stop, poll_s=0.002)

    def record(self, pipeline: str, due_at: datetime, action: str, reason: str, run_id: str | None) -> None:
        self.records.append((pipeline, due_at, action, reason, run_id))

    def at(self, now: datetime) -> float:
        self.clock.now = now
        return self.scheduler.step()

    def until(self, condition: Callable[[], bool]) -> None:
        """Steps (without moving the clock) until `condition` holds; fails after DEADLINE_S."""
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            assert time.monotonic() < deadline, f"timed out; records: {self.records}"
            self.scheduler.step()
            time.sleep(0.001)

    def recorded(self, count: int) -> None:
        self.until(lambda: len(self.records) >= count)
        assert len(self.records) == count, self.records

    def started(self, count: int) -> None:
        self.until(lambda: len(self.run.calls) >= count)
        assert len(self.run.calls) == count


def write_pipeline(path: Path, cron: str = "* * * * *", overlap: str = "skip", catchup: bool = False,
                   name: str = "demo") -> None:
    """Writes the file so that its (mtime, size, inode) changes even within one mtime tick."""
    text = (f"name: {name}\nstages:\n  a: {{image: 'pipe-busybox:latest', command: 'true'}}\n"
            f"schedule: {{cron: '{cron}', timezone: UTC, overlap: {overlap}, "
            f"catchup: {str(catchup).lower()}}}\n")
    if path.exists():
        old = path.stat()
        path.write_text(text + "#" * (old.st_size % 7 + 1) + "\n")
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    else:
        path.write_text(text)


def test_fires_at_each_tick_and_records_the_run(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0))
    h.at(minute(0, 5))
    h.recorded(1)
    h.at(minute(0, 40))
    h.at(minute(1, 1))
    h.recorded(2)
    assert h.records == [("demo", minute(0), "fired", SUCCEEDED, "run-1"),
                         ("demo", minute(1), "fired", SUCCEEDED, "run-2")]
    assert h.run.calls == [(h.path, "schedule")] * 2


def test_a_clock_set_back_does_not_fire_a_tick_twice(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0))
    h.at(minute(0, 5))
    h.recorded(1)
    h.at(minute(0) - timedelta(seconds=30))
    h.at(minute(0, 10))
    h.recorded(1)
    assert len(h.run.calls) == 1


def test_step_says_how_long_to_wait_for_the_next_tick_at_most_poll_s(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0), cron="0 * * * *")
    assert h.at(minute(60) - timedelta(milliseconds=1)) == pytest.approx(0.001)
    assert h.at(minute(30)) == pytest.approx(0.002)


def test_survives_a_failing_run_and_a_run_that_raises(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path, FakeRun(1, RuntimeError("engine on fire"), 0))
    for n in range(3):
        h.at(minute(n, 1))
        h.recorded(n + 1)
    assert [(r[2], r[3], r[4]) for r in h.records] == [
        ("fired", "the run failed (exit code 1)", "run-1"),
        ("fired", "the run raised: engine on fire", None),
        ("fired", SUCCEEDED, "run-3")]
    assert "engine on fire" in caplog.text


def test_a_lock_held_by_another_run_is_a_skipped_tick(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(LockHeld("pipeline demo is locked by run r-42; wait for it"), 3))
    h.at(minute(0, 1))
    h.recorded(1)
    h.at(minute(1, 1))
    h.recorded(2)
    assert [(r[2], r[3]) for r in h.records] == [
        ("skipped", "pipeline demo is locked by run r-42; wait for it"),
        ("skipped", "another run of this pipeline holds its lock")]


def test_reloads_a_changed_file_and_keeps_the_last_valid_schedule(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path, FakeRun(0), cron="0 * * * *")
    h.at(minute(0, 1))
    h.recorded(1)
    write_pipeline(h.path, cron="30 * * * *")
    h.at(minute(1))
    h.at(minute(30, 2))
    h.recorded(2)
    assert h.records[1][1] == minute(30)
    h.path.write_text(h.path.read_text().replace("30 * * * *", "every half hour"))
    with caplog.at_level(logging.ERROR):
        h.at(minute(31))
    assert f"{h.path}:4: schedule.cron: not a valid cron expression: 'every half hour'" in caplog.text
    assert "keeping the previous schedule" in caplog.text
    h.at(minute(90, 1))
    h.recorded(3)
    assert h.records[2][1] == minute(90)  # still every :30


def test_overlap_skip_records_the_tick_that_came_while_running(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0, hold=True), overlap="skip")
    h.at(minute(0, 1))
    h.started(1)
    h.at(minute(1, 1))
    assert h.records == [("demo", minute(1), "skipped",
                          "previous run (tick at 2026-01-01T10:00:00Z) still running (overlap: skip)", None)]
    h.run.release.set()
    h.recorded(2)
    assert h.records[1] == ("demo", minute(0), "fired", SUCCEEDED, "run-1")
    assert len(h.run.calls) == 1


def test_overlap_queue_runs_one_queued_tick_after_the_running_one_and_coalesces_more(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0, hold=True), overlap="queue")
    h.at(minute(0, 1))
    h.started(1)
    h.at(minute(1, 1))
    h.at(minute(2, 1))
    reason = "coalesced into the queued run for the tick at 2026-01-01T10:01:00Z (overlap: queue)"
    assert h.records == [("demo", minute(2), "coalesced", reason, None)]
    assert len(h.run.calls) == 1
    h.run.release.set()
    h.recorded(3)
    assert h.records[1:] == [("demo", minute(0), "fired", SUCCEEDED, "run-1"),
                             ("demo", minute(1), "fired", SUCCEEDED, "run-2")]


def test_overlap_cancel_running_cancels_the_run_then_starts_the_new_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0, hold=True), overlap="cancel-running")
    h.at(minute(0, 1))
    h.started(1)
    h.at(minute(1, 1))
    assert h.run.cancels[0].is_set()
    h.started(2)
    reason = "cancelled by the tick at 2026-01-01T10:01:00Z (overlap: cancel-running); exit code 130"
    assert h.records == [("demo", minute(0), "fired", reason, "run-1")]
    assert not h.run.cancels[1].is_set()
    h.run.release.set()
    h.recorded(2)
    assert h.records[1] == ("demo", minute(1), "fired", SUCCEEDED, "run-2")


def test_catchup_after_downtime_fires_once_for_the_missed_ticks(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0), cron="0 * * * *", catchup=True, last=minute(-5 * 60))
    h.at(minute(-30))
    h.recorded(4)
    assert [(r[1].hour, r[2]) for r in h.records] == [(6, "coalesced"), (7, "coalesced"), (8, "coalesced"),
                                                      (9, "fired")]
    assert len(h.run.calls) == 1


def test_without_catchup_missed_ticks_are_recorded_as_skipped_and_nothing_runs(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0), cron="0 * * * *", last=minute(-5 * 60))
    h.at(minute(-30))
    assert [(r[1].hour, r[2], r[3]) for r in h.records] == [(hr, "skipped", MISSED) for hr in (6, 7, 8, 9)]
    assert h.run.calls == []


def test_stop_finishes_the_running_run_and_records_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0, hold=True), start=minute(0, 1))
    loop = threading.Thread(target=h.scheduler.run_forever)
    loop.start()
    deadline = time.monotonic() + DEADLINE_S
    while not h.run.calls:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    h.stop.set()
    h.run.release.set()
    loop.join(DEADLINE_S)
    assert not loop.is_alive()
    assert h.records == [("demo", minute(0), "fired", SUCCEEDED, "run-1")]
    assert not h.run.cancels[0].is_set()


def test_stop_with_on_stop_cancel_cancels_the_running_run_and_skips_the_queued_tick(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeRun(0, hold=True), overlap="queue", on_stop="cancel")
    h.at(minute(0, 1))
    h.started(1)
    h.at(minute(1, 1))
    h.stop.set()
    h.scheduler.run_forever()  # returns at once: stop is set; then shuts down
    assert h.run.cancels[0].is_set()
    assert h.records == [
        ("demo", minute(1), "skipped", "the scheduler stopped before the queued run started", None),
        ("demo", minute(0), "fired", "cancelled: the scheduler stopped (on_stop: cancel); exit code 130",
         "run-1")]
    assert len(h.run.calls) == 1


def test_a_history_that_cannot_be_written_does_not_stop_the_loop(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path, FakeRun(0))

    def broken(*_: object) -> None:
        raise OSError("disk full")

    h.scheduler._record_tick = broken
    h.at(minute(0, 1))
    h.until(lambda: "could not record the tick" in caplog.text)
    h.at(minute(1, 1))
    h.started(2)


def test_a_file_without_schedule_or_with_errors_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("stages:\n  a: {image: x, command: 'true'}\n")
    with pytest.raises(UsageError, match="has no `schedule:`"):
        Scheduler([path], load=load_pipeline, run=FakeRun(), record_tick=lambda *a: None,
                  last_tick=lambda n: None, clock=FakeClock(T0), stop=threading.Event())
    path.write_text("stages:\n  a: {image: x, command: 'true'}\n"
                    "schedule: {cron: '0 3 * * *', timezone: Mars/Base}\n")
    with pytest.raises(SpecError, match=r":3: schedule.timezone: unknown time zone 'Mars/Base'"):
        Scheduler([path], load=load_pipeline, run=FakeRun(), record_tick=lambda *a: None,
                  last_tick=lambda n: None, clock=FakeClock(T0), stop=threading.Event())


# --- crontab install / uninstall, through a fake `crontab` command that keeps the table in a file -----------


@pytest.fixture
def crontab(tmp_path: Path) -> tuple[str]:
    script = tmp_path / "crontab"
    script.write_text('#!/bin/sh\nf="$(dirname "$0")/table"\ncase "$1" in\n'
                      '  -l) [ -f "$f" ] || { echo "no crontab for tester" >&2; exit 1; }; cat "$f";;\n'
                      '  -) cat > "$f";;\n  *) exit 2;;\nesac\n')
    script.chmod(0o755)
    return (str(script),)


def test_install_prints_without_apply_and_writes_with_it(tmp_path: Path, crontab: tuple[str]) -> None:
    entry = crontab_line(tmp_path / "p" / "pipeline.yaml", Schedule(cron="@daily"), "/usr/bin/pipe", {},
                         state_dir=tmp_path / "runs", system_timezone="UTC")
    assert read_crontab(crontab) == ""
    assert install_crontab(entry, apply=False, crontab=crontab) == entry.text
    assert not (tmp_path / "table").exists()
    install_crontab(entry, apply=True, crontab=crontab)
    install_crontab(entry, apply=True, crontab=crontab)
    assert (tmp_path / "table").read_text() == entry.text
    assert uninstall_crontab(entry.marker, crontab=crontab) == 2
    assert (tmp_path / "table").read_text() == ""
    assert uninstall_crontab(crontab_marker(tmp_path / "p" / "pipeline.yaml"), crontab=crontab) == 0


def test_a_missing_or_failing_crontab_command_is_a_crontab_error(tmp_path: Path) -> None:
    with pytest.raises(CrontabError, match="not found: install cron"):
        read_crontab((str(tmp_path / "no-such-crontab"),))
    failing = tmp_path / "crontab"
    failing.write_text("#!/bin/sh\necho 'crontab: your account is not allowed' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(CrontabError, match="`crontab -l` failed: crontab: your account is not allowed"):
        read_crontab((str(failing),))


def test_system_timezone_comes_from_the_localtime_link_or_etc_timezone(tmp_path: Path) -> None:
    zoneinfo = tmp_path / "usr" / "share" / "zoneinfo" / "Europe"
    zoneinfo.mkdir(parents=True)
    (zoneinfo / "Berlin").write_bytes(b"TZif")
    (tmp_path / "localtime").symlink_to(zoneinfo / "Berlin")
    assert system_timezone(tmp_path / "localtime", tmp_path / "timezone") == "Europe/Berlin"
    (tmp_path / "timezone").write_text("America/New_York\n")
    assert system_timezone(tmp_path / "missing", tmp_path / "timezone") == "America/New_York"
    assert system_timezone(tmp_path / "missing", tmp_path / "missing-too") is None
