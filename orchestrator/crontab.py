"""The user's crontab: read it, install a pipeline's entry (cron.crontab_line) into it, remove it again, and the
system time zone cron reads its fields in. The only module that runs `crontab`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from orchestrator import cron
from orchestrator.cron import CrontabEntry
from orchestrator.errors import ExitCode, PipeError


class CrontabError(PipeError):
    """The crontab command is missing or refused the table."""

    exit_code = ExitCode.INFRA


def read_crontab(crontab: Sequence[str] = ("crontab",)) -> str:
    """The user's crontab; empty when there is none."""
    done = _crontab(crontab, "-l")
    if done.returncode != 0:
        if "no crontab for" in done.stderr:
            return ""
        raise CrontabError(f"`crontab -l` failed: {done.stderr.strip() or f'exit code {done.returncode}'}")
    return done.stdout


def install_crontab(entry: CrontabEntry, *, apply: bool, crontab: Sequence[str] = ("crontab",)) -> str:
    """The crontab with the entry instead of the pipeline's earlier lines; written only with `apply`."""
    table = cron.with_entry(read_crontab(crontab), entry)
    if apply:
        _write_crontab(table, crontab)
    return table


def uninstall_crontab(marker: str, *, crontab: Sequence[str] = ("crontab",)) -> int:
    """Removes exactly the lines ending in `marker`; returns how many there were (0: nothing written)."""
    table = read_crontab(crontab)
    kept = cron.without_entry(table, marker)
    removed = len(table.splitlines()) - len(kept.splitlines())
    if removed:
        _write_crontab(kept, crontab)
    return removed


def _write_crontab(table: str, crontab: Sequence[str]) -> None:
    done = _crontab(crontab, "-", stdin=table)
    if done.returncode != 0:
        problem = done.stderr.strip() or f"exit code {done.returncode}"
        raise CrontabError(f"crontab refused the new table: {problem}")


def _crontab(crontab: Sequence[str], arg: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([*crontab, arg], input=stdin, check=False, capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError as e:
        raise CrontabError(f"{crontab[0]} not found: install cron (Debian: apt-get install cron)") from e
    except subprocess.TimeoutExpired as e:
        raise CrontabError(f"`{' '.join(crontab)} {arg}` did not answer in 30 s") from e


def system_timezone(localtime: Path = Path("/etc/localtime"), timezone_file: Path = Path("/etc/timezone")
                    ) -> str | None:
    """The IANA name of the zone the cron daemon reads its fields in, or None when it cannot be told."""
    try:
        target = str(localtime.resolve(strict=True))
    except OSError:
        target = ""
    if "/zoneinfo/" in target:
        return target.split("/zoneinfo/", 1)[1]
    try:
        return timezone_file.read_text().strip() or None
    except OSError:
        return None
