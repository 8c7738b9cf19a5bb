"""`pipe gc` on the state dir: which runs keep their folders, removing the others' folders, the ledger of pruned
runs, and what the state dir holds on disk. Decides from history records given to it; opens no database, knows
nothing of Docker (images.py removes images) or of manifests (cache.py collects the cache).

A run keeps its folder when it is among the newest `keep_runs`, started in the last `keep_days`, is running, or
is the latest run that succeeded (whatever the policy: it is what the next `pipe run --stage` and the cache build
on), or is held for a reason given (the served model and the one rollback goes back to: its folder is the
replicas' /model, and `pipe serve rollback` and `serve up` mount it again). Every other run of the pipeline loses
`runs/<run-id>/` (outputs, logs, params) but stays in history; the ledger `runs/pruned.json` says when, so
`pipe show` and `pipe logs` can tell a pruned run from a broken one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from orchestrator.cache import Cache
from orchestrator.fsops import Freed, disk_bytes
from orchestrator.results import RunStatus
from orchestrator.state import StateDir
from orchestrator.store.records import RunInfo, iso_utc

LEDGER = "pruned.json"
LEDGER_VERSION = 1
RUN_FOLDER = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4,}$")  # store.new_run_id


@dataclass(frozen=True)
class KeepPolicy:
    keep_runs: int | None = None
    keep_days: float | None = None


@dataclass(frozen=True)
class RunsPlan:
    keep: tuple[RunInfo, ...]  # their folders, cache entries and images stay
    remove: tuple[RunInfo, ...]  # not kept, and their folder is still there
    held: tuple[tuple[str, str], ...] = ()  # (run id, why): kept only for a reason given, the policy would remove it


def plan_runs(runs: Iterable[RunInfo], policy: KeepPolicy, now: datetime,
              has_folder: Callable[[str], bool], hold: Mapping[str, str] | None = None) -> RunsPlan:
    """Splits a pipeline's runs (newest first, as Store.list_runs gives them) by the policy; a run in `hold`
    (run id -> why) is kept whatever the policy says, and reported with its reason when only that keeps it."""
    runs, hold = list(runs), hold or {}
    latest_success = next((r.id for r in runs if r.status == RunStatus.SUCCEEDED), None)
    since = now - timedelta(days=policy.keep_days) if policy.keep_days is not None else None
    keep, remove, held = [], [], []
    for index, run in enumerate(runs):
        if (run.id == latest_success or run.status == RunStatus.RUNNING
                or (policy.keep_runs is not None and index < policy.keep_runs)
                or (since is not None and run.started_at >= since)):
            keep.append(run)
        elif run.id in hold:
            keep.append(run)
            if has_folder(run.id):
                held.append((run.id, hold[run.id]))
        elif has_folder(run.id):
            remove.append(run)
    return RunsPlan(tuple(keep), tuple(remove), tuple(held))


def remove_tree(root: Path, freed: Freed, dry_run: bool) -> None:
    """Removes root and everything under it, noting each entry in `freed` just before it goes. Folders a stage
    made read-only are opened to their owner first; symlinks are removed, never followed."""
    if not root.is_dir() or root.is_symlink():
        return
    if not dry_run:
        with suppress(OSError):
            root.chmod(0o700)
        for folder, dirs, _ in os.walk(root):
            for name in dirs:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    with suppress(OSError):
                        os.chmod(path, 0o700)
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            freed.note(st)
            if not dry_run:
                os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    freed.note(root.lstat())
    if not dry_run:
        root.rmdir()


def remove_runs(state: StateDir, runs: Iterable[RunInfo], freed: Freed, dry_run: bool) -> None:
    for run in runs:
        remove_tree(state.run_dir(run.id), freed, dry_run)


def record_pruned(state: StateDir, run_ids: Iterable[str], at: datetime) -> None:
    """Adds the runs to the ledger (atomically: a temporary file, then a rename)."""
    ledger = _read_ledger(state)
    ledger.update({run_id: iso_utc(at) or "" for run_id in run_ids})
    fd, tmp = tempfile.mkstemp(prefix=".pruned-", suffix=".json", dir=state.root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": LEDGER_VERSION, "runs": ledger}, f, indent=1, sort_keys=True)
        os.replace(tmp, state.root / LEDGER)
    except BaseException:
        os.unlink(tmp)
        raise


def pruned_at(state: StateDir, run_id: str) -> datetime | None:
    """When gc removed this run's folder; None when it did not (or the ledger is gone)."""
    at = _read_ledger(state).get(run_id)
    try:
        return datetime.fromisoformat(at) if at else None
    except ValueError:
        return None


def _read_ledger(state: StateDir) -> dict[str, str]:
    try:
        data = json.loads((state.root / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    runs = data.get("runs") if isinstance(data, dict) and data.get("version") == LEDGER_VERSION else None
    return {str(k): str(v) for k, v in runs.items()} if isinstance(runs, dict) else {}


@dataclass(frozen=True)
class DiskUse:
    cache_bytes: int  # blocks under runs/cache
    runs_bytes: int  # blocks of run folders not already counted in the cache (hard links count once)
    run_folders: int

    @property
    def total_bytes(self) -> int:
        return self.cache_bytes + self.runs_bytes


def disk_use(state: StateDir) -> DiskUse:
    """What the cache and the run folders hold on disk, each inode once (a walk: one lstat per entry)."""
    seen: set[tuple[int, int]] = set()
    cache = Cache(state.cache_dir).disk_bytes(seen)
    runs = folders = 0
    with suppress(FileNotFoundError), os.scandir(state.root) as found:
        for entry in found:
            if RUN_FOLDER.match(entry.name) and entry.is_dir(follow_symlinks=False):
                folders += 1
                st = entry.stat(follow_symlinks=False)
                runs += disk_bytes(Path(entry.path), seen) + st.st_blocks * 512
    return DiskUse(cache, runs, folders)
