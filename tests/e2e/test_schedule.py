"""Scheduled retraining for real: the built-in scheduler firing real runs, and a crontab line under Debian's cron."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator import api
from orchestrator.events import NullReporter
from tests.conftest import BUSYBOX, wait_for
from tests.e2e.helpers import pipe, pipe_json

SCHEDULED = {
    "name": "nightly",
    "schedule": {"cron": "* * * * *", "timezone": "Europe/Berlin", "overlap": "skip"},
    "stages": {
        "data": {"image": BUSYBOX, "command": "cat raw.txt > /outputs/clean.txt", "inputs": ["raw.txt"]},
        "train": {"image": BUSYBOX, "command": "wc -l < /inputs/data/clean.txt > /outputs/model.txt",
                  "needs": ["data"]},
    },
}


class FastClock:
    """Starts just before a minute boundary and advances 5 s per reading, so a tick comes every 12 steps."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 2, 59, 50, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=5)
            return self.now


def test_scheduler_fires_twice_and_the_second_run_is_all_cached(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(SCHEDULED, files={"raw.txt": "a\nb\n"})
    stop = threading.Event()
    scheduled_runs: list[Any] = []

    def two_runs_finished() -> bool:
        runs = api.list_runs(api.Target(path), status=None, trigger="schedule", limit=10)
        scheduled_runs[:] = runs
        return sum(r.status != "running" for r in runs) >= 2

    thread = threading.Thread(
        target=api.run_scheduler,
        args=([path], api.Target(path), NullReporter(), stop),
        kwargs={"clock": FastClock(), "wait": lambda s: stop.wait(0.05)},
    )
    thread.start()
    try:
        wait_for(two_runs_finished, timeout=120, what="two scheduled runs")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    oldest, newer = scheduled_runs[-1], scheduled_runs[-2]
    assert oldest.status == "succeeded" and newer.status == "succeeded"
    assert {s.stage: str(s.status) for s in newer.stages} == {"data": "cached", "train": "cached"}
    runs = pipe_json("runs", path)  # the CLI sees them too, with the trigger recorded
    assert [r["trigger"] for r in runs][:2] == ["schedule", "schedule"]
    report = pipe_json("schedule", path)  # and every tick the scheduler owed, with what became of it
    assert report["cron"] == "* * * * *" and len(report["next"]) == 5
    fired = [t for t in report["ticks"] if t["action"] == "fired"]
    assert {t["run_id"] for t in fired} >= {oldest.id, newer.id}
    assert all(t["reason"] for t in report["ticks"] if t["action"] != "fired")


@pytest.fixture
def cron_daemon() -> None:
    """Debian's cron, installed by scripts/setup.sh; started here when it is not running."""
    if shutil.which("cron") is None or shutil.which("crontab") is None:
        pytest.fail("Debian's cron is not installed: run scripts/setup.sh")
    if subprocess.run(["pgrep", "-x", "cron"], capture_output=True, check=False).returncode != 0:
        subprocess.run(["cron"], check=True)


def test_crontab_line_runs_the_pipeline_under_real_cron(
    docker: Any, make_pipeline: Callable[..., Path], cron_daemon: None
) -> None:
    path = make_pipeline(SCHEDULED, files={"raw.txt": "a\n"})
    installed = pipe("schedule", "install", path, "--apply", "--force")  # Berlin: not cron's zone
    assert installed.returncode == 0, installed.stderr
    try:
        listing = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=True).stdout
        assert f"# pipe:{path}" in listing
        runs = wait_for(
            lambda: [r for r in pipe_json("runs", path) if r["status"] != "running"],
            timeout=150, what="cron to fire the pipeline",
        )
        assert runs[0]["trigger"] == "schedule"
        assert runs[0]["status"] == "succeeded"
    finally:
        removed = pipe("schedule", "uninstall", path)
    assert removed.returncode == 0 and "removed 2 crontab lines" in removed.stdout
    listing = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=False).stdout
    assert f"# pipe:{path}" not in listing


def test_install_apply_refuses_a_zone_cron_would_not_honour_unless_forced(
    make_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = make_pipeline({**SCHEDULED, "schedule": {"cron": "0 3 * * *", "timezone": "Pacific/Chatham"}},
                         files={"raw.txt": "a\n"})
    table = tmp_path / "table"
    fake = tmp_path / "bin" / "crontab"  # keeps the table in a file: the real user's crontab is not touched
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ncase "$1" in\n  -l) cat "{table}" 2>/dev/null || {{ echo "no crontab for t" >&2; '
                    f'exit 1; }};;\n  -) cat > "{table}";;\nesac\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    refused = pipe("schedule", "install", path, "--apply", env=env)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: not installed: schedule.timezone is Pacific/Chatham but cron reads")
    assert refused.stderr.rstrip().endswith("--force installs it anyway")
    assert not table.exists()
    forced = pipe("schedule", "install", path, "--apply", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert f"# pipe:{path}" in table.read_text()
    printed = pipe("schedule", "install", path, env=env)  # printing is never refused: it only warns
    assert printed.returncode == 0 and "warning: schedule.timezone" in printed.stderr
