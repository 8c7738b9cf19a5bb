"""Fire times from a Schedule and an injected clock (croniter), and crontab lines. Pure but for croniter."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def schedule_problem(cron: str, timezone: str) -> tuple[str, str] | None:
    """(key, problem) when the schedule is invalid ("cron" or "timezone"), else None."""
    from croniter import croniter

    if not croniter.is_valid(cron):
        return "cron", f"not a valid cron expression: {cron!r} (five fields, or @daily, @hourly, ...)"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return "timezone", f"unknown time zone {timezone!r} (use an IANA name such as Europe/Berlin)"
    return None
