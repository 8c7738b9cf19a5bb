"""prune: which runs keep their folders, removing the others with what the disk gets back, the ledger, disk use."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator import prune
from orchestrator.cache import Cache
from orchestrator.fsops import Freed
from orchestrator.hashing import hash_tree
from orchestrator.results import RunStatus
from orchestrator.state import StateDir
from orchestrator.store.records import RunInfo
from tests.unit.test_cache import ingredients, make_outputs

NOW = datetime(2026, 5, 9, 12, 0, tzinfo=UTC)


def run(n: int, status: RunStatus = RunStatus.SUCCEEDED, days_ago: float = 0) -> RunInfo:
    return RunInfo(id=f"20260509-1200{n:02d}-ab{n:02d}", pipeline="p", pipeline_path="/p/pipeline.yaml",
                   pipeline_hash="h", trigger="manual", status=status,
                   started_at=NOW - timedelta(days=days_ago, seconds=n), finished_at=None, git_commit=None,
                   host="h", pid=1, exit_code=0, params_override={}, stages=())


def ids(runs: tuple[RunInfo, ...]) -> list[str]:
    return [r.id[-4:] for r in runs]


def test_plan_keeps_the_newest_n_and_removes_the_rest_that_have_folders() -> None:
    runs = [run(1), run(2), run(3), run(4)]
    plan = prune.plan_runs(runs, prune.KeepPolicy(keep_runs=2), NOW, lambda run_id: not run_id.endswith("04"))
    assert (ids(plan.keep), ids(plan.remove)) == (["ab01", "ab02"], ["ab03"])


def test_plan_never_removes_the_latest_successful_run_nor_a_running_one() -> None:
    runs = [run(1, RunStatus.FAILED), run(2, RunStatus.RUNNING), run(3), run(4), run(5, RunStatus.RUNNING)]
    plan = prune.plan_runs(runs, prune.KeepPolicy(keep_runs=0), NOW, lambda run_id: True)
    assert (ids(plan.keep), ids(plan.remove)) == (["ab02", "ab03", "ab05"], ["ab01", "ab04"])


def test_plan_keeps_a_held_run_the_policy_would_remove_and_says_why() -> None:
    runs = [run(1), run(2), run(3), run(4)]
    hold = {runs[2].id: "it is the served model", runs[3].id: "rollback goes back to it"}
    plan = prune.plan_runs(runs, prune.KeepPolicy(keep_runs=1), NOW, lambda run_id: not run_id.endswith("04"), hold)
    assert (ids(plan.keep), ids(plan.remove)) == (["ab01", "ab03", "ab04"], ["ab02"])
    assert plan.held == ((runs[2].id, "it is the served model"),)  # ab04 has no folder left to keep
    assert prune.plan_runs(runs, prune.KeepPolicy(keep_runs=1), NOW, lambda r: True, {runs[0].id: "x"}).held == ()


def test_plan_keeps_the_last_days_or_the_last_runs() -> None:
    runs = [run(1, RunStatus.FAILED, days_ago=1), run(2, days_ago=3), run(3, days_ago=8), run(4, days_ago=9)]
    assert ids(prune.plan_runs(runs, prune.KeepPolicy(keep_days=7), NOW, lambda r: True).remove) == \
        ["ab03", "ab04"]
    assert ids(prune.plan_runs(runs, prune.KeepPolicy(keep_runs=3, keep_days=2), NOW, lambda r: True).remove) \
        == ["ab04"]


def saved_run(state: StateDir, run_id: str) -> tuple[Cache, Path]:
    out = make_outputs(state.outputs_dir(run_id, "train"))
    state.log_path(run_id, "train").write_text("a log\n")
    cache = Cache(state.cache_dir)
    ing = ingredients()
    cache.save(ing.key(), out, hash_tree(out), ing, run_id, "train")
    return cache, out


def blocks_under(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in [root, *root.rglob("*")])


def test_a_run_folder_hard_linking_kept_blobs_frees_only_what_is_its_own(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "runs").ensure()
    cache, out = saved_run(state, "run-1")
    folder = state.run_dir("run-1")
    shared = sum(p.lstat().st_blocks * 512 for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    expected = blocks_under(folder) - shared
    preview = Freed()
    prune.remove_tree(folder, preview, dry_run=True)
    assert folder.is_dir(), "a dry run removes nothing"
    (out / "sub").chmod(0o500)  # a stage may leave read-only folders behind
    freed = Freed()
    prune.remove_tree(folder, freed, dry_run=False)
    assert not folder.exists()
    assert freed.bytes == preview.bytes == expected
    assert freed.still_linked == shared
    assert cache.lookup(ingredients().key()).manifest is not None


def test_a_run_folder_and_the_blobs_it_links_count_each_block_once(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "runs").ensure()
    cache, _ = saved_run(state, "run-1")
    folder = state.run_dir("run-1")
    removed = [folder, *folder.rglob("*"), *(p for p in cache.root.rglob("*") if p.is_file())]
    expected = sum({(st.st_dev, st.st_ino): st.st_blocks * 512 for st in map(Path.lstat, removed)}.values())
    freed = Freed()
    prune.remove_tree(state.run_dir("run-1"), freed, dry_run=False)
    report = cache.gc(set(), freed=freed)
    assert report.bytes_freed == freed.bytes == expected
    assert freed.still_linked == 0


def test_ledger_records_when_a_run_was_pruned(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "runs").ensure()
    assert prune.pruned_at(state, "run-1") is None
    prune.record_pruned(state, ["run-1", "run-2"], NOW)
    prune.record_pruned(state, ["run-3"], NOW + timedelta(days=1))
    assert prune.pruned_at(state, "run-1") == NOW
    assert prune.pruned_at(state, "run-3") == NOW + timedelta(days=1)
    assert sorted(p.name for p in state.root.iterdir()) == sorted([".gitignore", prune.LEDGER])  # no temp left
    (state.root / prune.LEDGER).write_text("{damaged")
    assert prune.pruned_at(state, "run-1") is None


def test_disk_use_counts_hard_links_into_the_cache_once(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "runs").ensure()
    saved_run(state, "20260509-120000-ab01")
    other = state.run_dir("20260509-120001-ab02")
    other.mkdir()
    (other / "big.bin").write_bytes(os.urandom(100_000))
    (state.root / "pipe.db").write_bytes(b"not a run folder" * 1000)
    use = prune.disk_use(state)
    assert use.cache_bytes == blocks_under(state.cache_dir) - state.cache_dir.lstat().st_blocks * 512
    linked = {(p.lstat().st_dev, p.lstat().st_ino) for p in state.cache_dir.rglob("*")}
    runs = [p for d in (state.run_dir("20260509-120000-ab01"), other) for p in [d, *d.rglob("*")]]
    assert use.runs_bytes == sum(p.lstat().st_blocks * 512 for p in runs
                                 if (p.lstat().st_dev, p.lstat().st_ino) not in linked)
    assert use.run_folders == 2
    assert use.total_bytes == use.cache_bytes + use.runs_bytes


@pytest.mark.parametrize("name", ["cache", "lock", "images.json", "20260509-1200-ab"])
def test_disk_use_ignores_what_is_not_a_run_folder(tmp_path: Path, name: str) -> None:
    state = StateDir(tmp_path / "runs").ensure()
    (state.root / name).mkdir()
    assert prune.disk_use(state).run_folders == 0
