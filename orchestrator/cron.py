"""When a Schedule fires, which ticks are due for an injected clock, and the crontab line for a pipeline.

Pure but for croniter: no clock, no threads, no subprocess. Every datetime in and out is aware and in UTC.

The daylight-saving rule, applied everywhere (`pipe schedule`, `pipe scheduler`):
- the cron fields are read as wall-clock time in the schedule's time zone;
- a tick whose local time falls in a skipped hour (spring forward) fires once, at the transition instant;
- a local time that occurs twice (fall back) fires once, at its first occurrence;
- ticks are deduplicated by UTC instant: ticks that land on the same instant fire once.
croniter 7 with a zoneinfo start agrees on spring forward but fires a repeated local time twice, so the ticks
are computed on naive wall-clock times (where no DST exists) and mapped to UTC here (`_to_utc`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice, takewhile
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from orchestrator.errors import ExitCode, UsageError
from orchestrator.spec import Schedule

GRACE = timedelta(seconds=60)  # a tick this late still fires with catchup: false (the loop woke late)
MISSED = "missed while the scheduler was down (catchup: false)"
TRIGGER = "schedule"  # what `pipe run --trigger` records for a scheduled run

# Five standard fields: numbers or three-letter names, ranges, steps, lists. croniter also takes seconds,
# L, W, # and ?, which Debian's cron rejects; a schedule must mean the same under `pipe scheduler` and cron.
_ATOM = r"(?:[0-9]+|[A-Za-z]{3})"
_ITEM = rf"(?:\*|{_ATOM}(?:-{_ATOM})?)(?:/[0-9]+)?"
_FIELD = re.compile(rf"{_ITEM}(?:,{_ITEM})*")
NICKNAMES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Universal", "Etc/Universal", "Zulu", "Etc/Zulu",
                        "GMT", "Etc/GMT", "GMT0", "Etc/GMT0", "Etc/GMT+0", "Etc/GMT-0", "Greenwich"})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def schedule_problem(cron: str, timezone: str) -> tuple[str, str] | None:
    """(key, problem) when the schedule is invalid ("cron" or "timezone"), else None."""
    fields = cron.split()
    standard = cron.strip() in NICKNAMES or (len(fields) == 5 and all(_FIELD.fullmatch(f) for f in fields))
    if not standard or not croniter.is_valid(cron):
        return "cron", (f"not a valid cron expression: {cron!r} "
                        "(five fields such as '0 3 * * 1-5', or @daily, @hourly)")
    try:
        croniter(cron, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        return "cron", f"{cron!r} never fires: no date matches it"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return "timezone", f"unknown time zone {timezone!r} (use an IANA name such as Europe/Berlin)"
    return None


def next_fire_times(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    """The next `count` fire instants strictly after `after`, ascending; for `pipe schedule`."""
    return list(islice(_ticks_after(schedule, _utc(after)), count))


# What to do about a due tick; the store records what became of it (store.records.TickAction: fired, ...).
TickDecision = Literal["fire", "skip", "coalesce"]


@dataclass(frozen=True)
class Tick:
    due_at: datetime
    decision: TickDecision
    reason: str | None = None  # None when it fires


@dataclass(frozen=True)
class TickPlan:
    """Every tick in (last_tick, now], oldest first, each with what to do about it; at most the last fires."""

    ticks: tuple[Tick, ...]

    @property
    def fire(self) -> Tick | None:
        return next((t for t in self.ticks if t.decision == "fire"), None)


def due_ticks(schedule: Schedule, last_tick: datetime | None, now: datetime) -> TickPlan:
    """Account for every tick after `last_tick` (exclusive) up to `now` (inclusive).

    `last_tick` is the instant up to which ticks were already accounted for; None (never) means from GRACE
    before `now` (inclusive), so nothing older than that is owed on the first start. The rule:
    - only the latest due tick can fire: always with catchup: true (one run for all the missed ticks), and
      with catchup: false only when it is at most GRACE late;
    - an earlier tick more than GRACE late is "skip" (reason MISSED) with catchup: false, and "coalesce" into
      the catch-up run with catchup: true;
    - an earlier tick at most GRACE late (the loop woke late) is "coalesce" into the run that fires;
    - the latest tick more than GRACE late with catchup: false is "skip" (MISSED) too, and nothing fires.
    """
    now = _utc(now)
    start = _utc(last_tick) if last_tick is not None else now - GRACE - timedelta(microseconds=1)
    due = list(takewhile(lambda at: at <= now, _ticks_after(schedule, start)))
    if not due:
        return TickPlan(())
    latest = due[-1]
    fires = schedule.catchup or now - latest <= GRACE
    ticks = []
    for at in due[:-1]:
        late = now - at > GRACE
        if late and not schedule.catchup:
            ticks.append(Tick(at, "skip", MISSED))
        elif late:
            ticks.append(Tick(at, "coalesce", f"missed while the scheduler was down; coalesced into the "
                                              f"catch-up run for the tick at {iso(latest)} (catchup: true)"))
        else:
            ticks.append(Tick(at, "coalesce", f"coalesced into the run for the tick at {iso(latest)} "
                                              f"(the scheduler woke late)"))
    ticks.append(Tick(latest, "fire") if fires else Tick(latest, "skip", MISSED))
    return TickPlan(tuple(ticks))


def iso(at: datetime) -> str:
    """An instant as people read it in history: 2026-03-29T01:00:00Z."""
    return _utc(at).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at!r}: pass an aware UTC datetime")
    return at.astimezone(UTC)


def _ticks_after(schedule: Schedule, after: datetime) -> Iterator[datetime]:
    """Every fire instant strictly after `after`, ascending and without repeats, by the DST rule; endless."""
    zone = ZoneInfo(schedule.timezone)
    wall = croniter(schedule.cron, after.astimezone(zone).replace(tzinfo=None))  # naive: no DST in here
    last = after
    while True:
        at = _to_utc(wall.get_next(datetime), zone)
        if at > last:  # drops the skipped hour's duplicates and a repeated hour's second pass before `after`
            last = at
            yield at


def _to_utc(local: datetime, zone: ZoneInfo) -> datetime:
    """The instant of a naive wall-clock time in `zone`: its first occurrence, or the gap's transition."""
    first = local.replace(tzinfo=zone, fold=0).astimezone(UTC)  # PEP 495: fold=0 is the earlier of two
    if first.astimezone(zone).replace(tzinfo=None) == local:
        return first
    # Not a real local time: the clocks jumped over it. With fold=1 it maps before the jump, with fold=0
    # after it; bisect to the second at which the offset changes.
    before = int(local.replace(tzinfo=zone, fold=1).timestamp())
    after = int(first.timestamp())
    offset = first.astimezone(zone).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == offset:
            after = middle
        else:
            before = middle
    return datetime.fromtimestamp(after, UTC)


@dataclass(frozen=True)
class CrontabEntry:
    marker: str  # "# pipe:<abs pipeline path>" ends each of the entry's lines; uninstall removes exactly them
    text: str  # a comment line and the job line, each ending in a newline
    warning: str | None  # set when cron would read the fields in a time zone other than the schedule's


MAX_CRON_LINE = 990  # Debian's cron refuses longer commands ("command too long"); 998 with the fields


def crontab_marker(pipeline_path: Path) -> str:
    return f"# pipe:{pipeline_path}"


def crontab_line(pipeline_path: Path, schedule: Schedule, pipe_executable: str, env: Mapping[str, str], *,
                 state_dir: Path, system_timezone: str | None) -> CrontabEntry:
    """The crontab entry that runs `pipe run <pipeline> --trigger schedule` at the schedule's times.

    Cron has no per-line time zone (CRON_TZ is cronie's, and Debian's cron ignores it), so the five fields are
    written as they are and cron reads them in the system time zone: `warning` says so when that is not the
    schedule's zone; `pipe scheduler` honours the zone. The job creates `state_dir` (0700), cds into the
    pipeline's folder, sets `env` (PATH, PIPE_STATE_DIR, ...: never secrets, a crontab is plain text), and
    appends all output to `state_dir/cron.log`. Cron mails only what a job prints, so the job prints one line
    when the run fails, and nothing when it succeeds or when the lock was held by another run (exit 3).
    Paths must be absolute; UsageError for a '%' (cron turns it into a newline) or a newline.
    """
    for path in (pipeline_path, Path(pipe_executable), state_dir):
        if not path.is_absolute():
            raise ValueError(f"{path} is not absolute: cron runs from the home folder")
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"not an environment variable name: {name!r}")
    marker = crontab_marker(pipeline_path)
    q = shlex.quote
    assignments = "".join(f"{name}={q(value)} " for name, value in env.items())
    # each path once, in shell variables: Debian's cron refuses lines over about 1000 characters
    command = (
        f"P={q(str(pipeline_path))} S={q(str(state_dir))}; "
        f'mkdir -p -m 700 "$S" && cd "$(dirname "$P")" && '
        f'{assignments}{q(pipe_executable)} run "$P" --trigger {TRIGGER} >> "$S/cron.log" 2>&1; '
        f'rc=$?; [ $rc -eq 0 ] || [ $rc -eq {int(ExitCode.LOCKED)} ] || '
        f'echo "pipe: the scheduled run of $P exited $rc; see $S/cron.log"'
    )
    if len(command) + len(marker) > MAX_CRON_LINE:
        raise UsageError(f"the crontab line for {pipeline_path} would be {len(command)} characters; Debian's cron "
                         f"refuses lines over {MAX_CRON_LINE}: use shorter paths or fewer environment variables")
    for text in (command, marker):
        if "%" in text or "\n" in text:
            raise UsageError(f"cannot write a crontab line for {pipeline_path}: cron treats '%' and newlines "
                             f"in a command specially; rename the folder or change the value")
    zone_note = f"system time zone ({system_timezone})" if system_timezone else "system time zone"
    warning = None
    if not _same_zone(schedule.timezone, system_timezone):
        warning = (f"schedule.timezone is {schedule.timezone} but cron reads {schedule.cron!r} in the "
                   f"{zone_note}; use `pipe scheduler`, or write the fields in system time")
    comment = f"# {schedule.cron} is read in the {zone_note}; the schedule says {schedule.timezone} {marker}"
    return CrontabEntry(marker, f"{comment}\n{schedule.cron} {command} {marker}\n", warning)


def with_entry(crontab: str, entry: CrontabEntry) -> str:
    """The crontab with this pipeline's earlier lines replaced by the entry, which goes at the end."""
    return without_entry(crontab, entry.marker) + entry.text


def without_entry(crontab: str, marker: str) -> str:
    """The crontab without the lines ending in `marker`; newline-terminated, as cron requires."""
    return "".join(f"{line}\n" for line in crontab.splitlines() if not line.rstrip().endswith(marker))


def _same_zone(schedule_zone: str, system_zone: str | None) -> bool:
    if schedule_zone == system_zone:
        return True
    return schedule_zone in _UTC_NAMES and system_zone in _UTC_NAMES
