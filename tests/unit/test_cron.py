"""Fire times, due ticks and crontab lines, with an injected clock; DST around the 2026 transitions."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orchestrator.cron import (
    GRACE,
    MISSED,
    CrontabEntry,
    crontab_line,
    crontab_marker,
    due_ticks,
    next_fire_times,
    schedule_problem,
    with_entry,
    without_entry,
)
from orchestrator.errors import UsageError
from orchestrator.spec import Schedule

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def schedule(cron: str, timezone: str = "UTC", **more: Any) -> Schedule:
    return Schedule(cron=cron, timezone=timezone, **more)


def hhmm(times: list[datetime]) -> list[str]:
    return [t.strftime("%m-%d %H:%M") for t in times]


# --- DST: Europe/Berlin springs forward on 2026-03-29 at 01:00Z (02:00 CET -> 03:00 CEST) -------------------


def test_a_tick_in_the_skipped_hour_fires_once_at_the_transition() -> None:
    fires = next_fire_times(schedule("30 2 * * *", BERLIN), at(2026, 3, 27, 12), 4)
    assert hhmm(fires) == ["03-28 01:30", "03-29 01:00", "03-30 00:30", "03-31 00:30"]


def test_ticks_in_the_skipped_hour_and_the_one_after_it_fire_once_when_they_share_the_instant() -> None:
    fires = next_fire_times(schedule("*/15 * * * *", BERLIN), at(2026, 3, 29, 0, 20), 5)
    # 02:00, 02:15, 02:30, 02:45 do not exist and 03:00 CEST is the transition itself: one fire at 01:00Z
    assert hhmm(fires) == ["03-29 00:30", "03-29 00:45", "03-29 01:00", "03-29 01:15", "03-29 01:30"]


def test_an_hourly_schedule_loses_the_skipped_hour() -> None:
    fires = next_fire_times(schedule("0 * * * *", BERLIN), at(2026, 3, 28, 23, 30), 3)
    assert hhmm(fires) == ["03-29 00:00", "03-29 01:00", "03-29 02:00"]


def test_the_transition_instant_is_exact_to_the_second() -> None:
    (fire,) = next_fire_times(schedule("59 2 * * *", BERLIN), at(2026, 3, 29, 0, 0), 1)
    assert fire == at(2026, 3, 29, 1, 0, 0)
    assert fire.astimezone(ZoneInfo(BERLIN)).strftime("%H:%M %Z") == "03:00 CEST"


# --- DST: Europe/Berlin falls back on 2026-10-25 at 01:00Z (03:00 CEST -> 02:00 CET) ------------------------


def test_a_repeated_local_time_fires_once_at_its_first_occurrence() -> None:
    fires = next_fire_times(schedule("30 2 * * *", BERLIN), at(2026, 10, 23, 12), 3)
    assert hhmm(fires) == ["10-24 00:30", "10-25 00:30", "10-26 01:30"]  # not 10-25 01:30Z (02:30 CET)


def test_every_quarter_hour_skips_the_second_pass_of_the_repeated_hour() -> None:
    fires = next_fire_times(schedule("*/15 * * * *", BERLIN), at(2026, 10, 24, 23, 40), 6)
    assert hhmm(fires) == ["10-24 23:45", "10-25 00:00", "10-25 00:15", "10-25 00:30", "10-25 00:45",
                           "10-25 02:00"]


def test_starting_inside_the_second_pass_of_the_repeated_hour_waits_for_the_next_new_time() -> None:
    second_pass = at(2026, 10, 25, 1, 40)  # 02:40 CET
    assert hhmm(next_fire_times(schedule("30 2 * * *", BERLIN), second_pass, 1)) == ["10-26 01:30"]
    assert hhmm(next_fire_times(schedule("*/15 * * * *", BERLIN), second_pass, 1)) == ["10-25 02:00"]


# --- DST: America/New_York, 2026-03-08 at 07:00Z (02:00 EST -> 03:00 EDT), 2026-11-01 at 06:00Z -------------


def test_new_york_spring_forward_fires_at_the_transition() -> None:
    fires = next_fire_times(schedule("30 2 * * *", NEW_YORK), at(2026, 3, 7, 12), 2)
    assert hhmm(fires) == ["03-08 07:00", "03-09 06:30"]
    fires = next_fire_times(schedule("0 2 * * *", NEW_YORK), at(2026, 3, 7, 12), 1)
    assert hhmm(fires) == ["03-08 07:00"]


def test_new_york_fall_back_fires_the_repeated_time_once() -> None:
    fires = next_fire_times(schedule("30 1 * * *", NEW_YORK), at(2026, 10, 31, 12), 2)
    assert hhmm(fires) == ["11-01 05:30", "11-02 06:30"]  # not 11-01 06:30Z (01:30 EST)
    fires = next_fire_times(schedule("0 * * * *", NEW_YORK), at(2026, 11, 1, 4, 30), 3)
    assert hhmm(fires) == ["11-01 05:00", "11-01 07:00", "11-01 08:00"]


def test_croniter_alone_fires_a_repeated_time_twice_which_is_why_cron_py_maps_wall_times_itself() -> None:
    from croniter import croniter  # only to pin the library behaviour that cron.py corrects

    berlin = ZoneInfo(BERLIN)
    fall = croniter("30 2 * * *", at(2026, 10, 24, 12).astimezone(berlin))
    assert hhmm([fall.get_next(datetime).astimezone(UTC) for _ in range(2)]) == ["10-25 00:30", "10-25 01:30"]
    spring = croniter("30 2 * * *", at(2026, 3, 28, 12).astimezone(berlin))
    assert hhmm([spring.get_next(datetime).astimezone(UTC)]) == ["03-29 01:00"]  # agrees with the rule
    new_york = ZoneInfo(NEW_YORK)
    fall = croniter("30 1 * * *", at(2026, 10, 31, 12).astimezone(new_york))
    assert hhmm([fall.get_next(datetime).astimezone(UTC) for _ in range(2)]) == ["11-01 05:30", "11-01 06:30"]
    spring = croniter("30 2 * * *", at(2026, 3, 7, 12).astimezone(new_york))
    assert hhmm([spring.get_next(datetime).astimezone(UTC)]) == ["03-08 07:00"]


def test_a_year_of_two_oclock_ticks_in_berlin_is_strictly_increasing_and_loses_one_skipped_tick() -> None:
    fires = next_fire_times(schedule("*/30 2 * * *", BERLIN), at(2025, 12, 31, 23, 0), 2 * 365)
    in_2026 = [f for f in fires if f < at(2026, 12, 31, 23, 0)]
    assert all(a < b for a, b in pairwise(in_2026))
    # 02:00 and 02:30 of 03-29 both fire at the transition, once; the repeated ones of 10-25 fire once each
    assert len(in_2026) == 2 * 365 - 1


def test_daily_and_hourly_nicknames_follow_the_zone() -> None:
    assert hhmm(next_fire_times(schedule("@daily", BERLIN), at(2026, 3, 28, 12), 2)) == ["03-28 23:00",
                                                                                         "03-29 22:00"]
    assert hhmm(next_fire_times(schedule("@hourly"), at(2026, 1, 1, 10), 2)) == ["01-01 11:00", "01-01 12:00"]


def test_fire_times_are_strictly_after_the_given_instant() -> None:
    assert next_fire_times(schedule("0 3 * * *"), at(2026, 1, 1, 3, 0), 1) == [at(2026, 1, 2, 3, 0)]


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        next_fire_times(schedule("@daily"), datetime(2026, 1, 1), 1)
    with pytest.raises(ValueError, match="naive"):
        due_ticks(schedule("@daily"), None, datetime(2026, 1, 1))


# --- due ticks ----------------------------------------------------------------------------------------------


def test_nothing_is_due_between_ticks() -> None:
    assert due_ticks(schedule("0 * * * *"), at(2026, 1, 1, 10, 0), at(2026, 1, 1, 10, 59, 59)).ticks == ()


def test_a_tick_on_time_fires() -> None:
    plan = due_ticks(schedule("0 * * * *"), at(2026, 1, 1, 10, 0), at(2026, 1, 1, 11, 0, 10))
    assert [(t.due_at, t.decision) for t in plan.ticks] == [(at(2026, 1, 1, 11), "fire")]
    assert plan.fire is not None and plan.fire.due_at == at(2026, 1, 1, 11)


def test_without_history_only_a_tick_within_the_grace_is_owed() -> None:
    hourly = schedule("0 * * * *")
    assert [t.decision for t in due_ticks(hourly, None, at(2026, 1, 1, 11, 0) + GRACE).ticks] == ["fire"]
    assert due_ticks(hourly, None, at(2026, 1, 1, 11, 0) + GRACE + timedelta(seconds=1)).ticks == ()


def test_without_catchup_missed_ticks_are_skipped_and_the_latest_fires_when_on_time() -> None:
    plan = due_ticks(schedule("0 * * * *"), at(2026, 1, 1, 5), at(2026, 1, 1, 9, 0, 20))
    assert [(t.due_at.hour, t.decision, t.reason) for t in plan.ticks] == [
        (6, "skip", MISSED), (7, "skip", MISSED), (8, "skip", MISSED), (9, "fire", None)]


def test_without_catchup_nothing_fires_when_even_the_latest_tick_is_late() -> None:
    plan = due_ticks(schedule("0 * * * *"), at(2026, 1, 1, 5), at(2026, 1, 1, 9, 30))
    assert [(t.due_at.hour, t.decision) for t in plan.ticks] == [(hour, "skip") for hour in (6, 7, 8, 9)]
    assert plan.fire is None
    assert {t.reason for t in plan.ticks} == {"missed while the scheduler was down (catchup: false)"}


def test_with_catchup_one_run_fires_for_all_missed_ticks() -> None:
    plan = due_ticks(schedule("0 * * * *", catchup=True), at(2026, 1, 1, 5), at(2026, 1, 1, 9, 30))
    assert [(t.due_at.hour, t.decision) for t in plan.ticks] == [
        (6, "coalesce"), (7, "coalesce"), (8, "coalesce"), (9, "fire")]
    assert plan.ticks[0].reason == ("missed while the scheduler was down; coalesced into the catch-up run "
                                    "for the tick at 2026-01-01T09:00:00Z (catchup: true)")


def test_an_earlier_tick_within_the_grace_is_coalesced_into_the_run_that_fires() -> None:
    plan = due_ticks(schedule("* * * * *"), at(2026, 1, 1, 9, 59, 30), at(2026, 1, 1, 10, 1))
    assert [(t.due_at.minute, t.decision) for t in plan.ticks] == [(0, "coalesce"), (1, "fire")]
    assert plan.ticks[0].reason == ("coalesced into the run for the tick at 2026-01-01T10:01:00Z "
                                    "(the scheduler woke late)")


def test_due_ticks_follow_the_dst_rule() -> None:
    repeated = schedule("30 2 * * *", BERLIN, catchup=True)
    plan = due_ticks(repeated, at(2026, 10, 24, 12), at(2026, 10, 25, 2))
    assert [(t.due_at, t.decision) for t in plan.ticks] == [(at(2026, 10, 25, 0, 30), "fire")]
    skipped = schedule("*/15 * * * *", BERLIN, catchup=True)
    plan = due_ticks(skipped, at(2026, 3, 29, 0, 45), at(2026, 3, 29, 1, 0, 5))
    assert [(t.due_at, t.decision) for t in plan.ticks] == [(at(2026, 3, 29, 1, 0), "fire")]


def test_the_last_tick_itself_is_not_due_again() -> None:
    assert due_ticks(schedule("0 * * * *"), at(2026, 1, 1, 9), at(2026, 1, 1, 9, 0, 30)).ticks == ()


# --- validation (the loader turns these into SpecError with file:line) --------------------------------------


@pytest.mark.parametrize("cron", ["0 3 * * 1-5", "@daily", "@hourly", "*/15 0-6,22-23 1 JAN-MAR mon-fri",
                                  "0 0 29 2 *", "5 4 * * 7"])
def test_standard_schedules_are_valid(cron: str) -> None:
    assert schedule_problem(cron, BERLIN) is None


@pytest.mark.parametrize("cron", ["61 * * * *", "0 3 * *", "0 0 3 * * *", "0 3 L * *", "0 3 * * MON#2",
                                  "@reboot", "@every 5m", "", "H 3 * * *", "0 3 ? * *"])
def test_non_standard_cron_strings_are_invalid(cron: str) -> None:
    problem = schedule_problem(cron, "UTC")
    assert problem is not None and problem[0] == "cron"
    assert problem[1].startswith("not a valid cron expression")


def test_a_cron_string_that_never_fires_is_invalid() -> None:
    assert schedule_problem("0 0 30 2 *", "UTC") == ("cron", "'0 0 30 2 *' never fires: no date matches it")


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "../etc/passwd", "europe/berlin "])
def test_unknown_time_zones_are_invalid(zone: str) -> None:
    problem = schedule_problem("@daily", zone)
    assert problem is not None and problem[0] == "timezone" and "IANA" in problem[1]


# --- crontab lines ------------------------------------------------------------------------------------------


def fake_pipe(folder: Path) -> Path:
    """A `pipe` that writes what it was given to report.txt beside itself and exits with $FAKE_EXIT."""
    script = folder / "bin" / "pipe"
    script.parent.mkdir(parents=True)
    script.write_text('#!/bin/sh\n{ echo "cwd=$(pwd)"; echo "args=$*"; echo "path=$PATH"; '
                      'echo "state=$PIPE_STATE_DIR"; } > "$(dirname "$0")/report.txt"\n'
                      'echo "pipe output line"\nexit "$FAKE_EXIT"\n')
    script.chmod(0o755)
    return script


def run_job(entry: CrontabEntry, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs the job line's command the way cron does: /bin/sh -c, the home folder, cron's minimal PATH."""
    job = entry.text.splitlines()[1]
    command = job.split(maxsplit=1)[1] if job.startswith("@") else job.split(maxsplit=5)[5]
    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=cron_env, capture_output=True, text=True,
                          check=False)


def make_entry(tmp_path: Path, exit_code: int, cron: str = "0 3 * * 1-5") -> tuple[CrontabEntry, Path, Path]:
    pipe = fake_pipe(tmp_path)
    folder = tmp_path / "my pipe's folder"
    folder.mkdir()
    state = tmp_path / "state dir"
    env = {"PATH": f"{pipe.parent}:/usr/bin:/bin", "PIPE_STATE_DIR": str(state), "FAKE_EXIT": str(exit_code)}
    entry = crontab_line(folder / "pipeline.yaml", schedule(cron, BERLIN), str(pipe), env,
                         state_dir=state, system_timezone=BERLIN)
    return entry, pipe.parent / "report.txt", state


def test_the_job_runs_pipe_from_the_pipeline_folder_with_its_environment_and_logs_to_the_state_dir(
        tmp_path: Path) -> None:
    entry, report, state = make_entry(tmp_path, 0)
    done = run_job(entry, tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")  # cron mails nothing on success
    folder = tmp_path / "my pipe's folder"
    assert report.read_text().splitlines() == [
        f"cwd={folder}", f"args=run {folder / 'pipeline.yaml'} --trigger schedule",
        f"path={report.parent}:/usr/bin:/bin", f"state={state}"]
    assert (state / "cron.log").read_text() == "pipe output line\n"
    assert (state.stat().st_mode & 0o777) == 0o700
    run_job(entry, tmp_path)
    assert (state / "cron.log").read_text() == "pipe output line\n" * 2  # appended, not replaced


def test_a_failed_run_prints_one_line_for_cron_to_mail(tmp_path: Path) -> None:
    entry, _, state = make_entry(tmp_path, 1)
    done = run_job(entry, tmp_path)
    pipeline = tmp_path / "my pipe's folder" / "pipeline.yaml"
    assert done.stdout == f"pipe: the scheduled run of {pipeline} exited 1; see {state / 'cron.log'}\n"


def test_a_run_that_found_the_lock_held_stays_quiet(tmp_path: Path) -> None:
    entry, _, state = make_entry(tmp_path, 3)
    assert run_job(entry, tmp_path).stdout == ""
    assert (state / "cron.log").read_text() == "pipe output line\n"


def test_a_nickname_schedule_makes_a_line_cron_reads(tmp_path: Path) -> None:
    entry, report, _ = make_entry(tmp_path, 0, cron="@daily")
    assert entry.text.splitlines()[1].startswith("@daily P=")
    assert run_job(entry, tmp_path).stdout == ""
    assert report.exists()


def test_every_line_of_the_entry_ends_with_the_marker(tmp_path: Path) -> None:
    entry, _, _ = make_entry(tmp_path, 0)
    assert entry.marker == f"# pipe:{tmp_path}/my pipe's folder/pipeline.yaml" == crontab_marker(
        tmp_path / "my pipe's folder" / "pipeline.yaml")
    lines = entry.text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("# ")
    assert all(line.endswith(entry.marker) for line in lines)
    assert entry.text.endswith("\n")


def test_a_time_zone_other_than_the_systems_is_a_warning(tmp_path: Path) -> None:
    def warning(zone: str, system: str | None) -> str | None:
        return crontab_line(tmp_path / "pipeline.yaml", schedule("0 3 * * *", zone), "/usr/bin/pipe", {},
                            state_dir=tmp_path / "runs", system_timezone=system).warning

    assert warning(BERLIN, BERLIN) is None
    assert warning("UTC", "Etc/UTC") is None
    assert warning(BERLIN, "Etc/UTC") == (
        "schedule.timezone is Europe/Berlin but cron reads '0 3 * * *' in the system time zone (Etc/UTC); "
        "use `pipe scheduler`, or write the fields in system time")
    assert warning("UTC", None) is not None


def test_a_percent_sign_in_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'%'"):
        crontab_line(tmp_path / "100%" / "pipeline.yaml", schedule("@daily"), "/usr/bin/pipe", {},
                     state_dir=tmp_path / "runs", system_timezone="UTC")


def test_relative_paths_and_bad_variable_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not absolute"):
        crontab_line(Path("pipeline.yaml"), schedule("@daily"), "/usr/bin/pipe", {}, state_dir=tmp_path,
                     system_timezone="UTC")
    with pytest.raises(ValueError, match="variable name"):
        crontab_line(tmp_path / "pipeline.yaml", schedule("@daily"), "/usr/bin/pipe", {"A B": "x"},
                     state_dir=tmp_path, system_timezone="UTC")


def test_installing_twice_replaces_the_entry_and_uninstall_removes_exactly_it(tmp_path: Path) -> None:
    def entry(path: str, cron: str) -> CrontabEntry:
        return crontab_line(Path(path), schedule(cron), "/usr/bin/pipe", {}, state_dir=Path("/srv/runs"),
                            system_timezone="UTC")

    mine, other = entry("/srv/a/pipeline.yaml", "@daily"), entry("/srv/x/srv/a/pipeline.yaml", "@hourly")
    table = "MAILTO=me@example.org\n# my own job\n0 1 * * * /usr/bin/backup"  # no final newline
    table = with_entry(with_entry(table, mine), other)
    table = with_entry(table, entry("/srv/a/pipeline.yaml", "0 5 * * *"))
    lines = table.splitlines()
    assert lines[:3] == ["MAILTO=me@example.org", "# my own job", "0 1 * * * /usr/bin/backup"]
    assert sum(mine.marker in line for line in lines) == 2
    assert any(line.startswith("0 5 * * * ") for line in lines)
    own = "MAILTO=me@example.org\n# my own job\n0 1 * * * /usr/bin/backup\n"
    assert without_entry(table, mine.marker) == own + other.text
