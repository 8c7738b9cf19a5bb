"""The standard-library writer of `pipe run` (store/sqlite_writer.py) writes exactly the rows Store writes: the
same calls go to Store on one real SQLite file and to the writer on another, and every table of the two is
compared row for row (run ids, which are random, and the instants taken from the clock are matched by shape)."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator import api
from orchestrator.errors import NotFound, StoreError
from orchestrator.executor import RanOn
from orchestrator.results import Artifact, RunStatus, StageStatus
from orchestrator.store.lease import this_host
from orchestrator.store.records import StageRecord
from orchestrator.store.sqlite_writer import SqliteRunStore
from orchestrator.store.store import Store
from tests.unit.test_store import FIXTURE_V1, T0, result, subprocess_pid

# columns written from the clock (now), compared by shape: "2026-12-02 10:19:14.123456" -> "9999-99-99 ..."
_CLOCK = {("run", "started_at"), ("run", "finished_at"), ("run", "heartbeat_at"), ("run", "lease_expires_at"),
          ("gate_baseline", "accepted_at")}


def _new(path: Path) -> Path:
    Store(f"sqlite:///{path}").close()  # Store creates and migrates; the writer takes the file from there
    return path


def _story(history: Store | SqliteRunStore, dead_pid: int) -> None:
    """Every write `pipe run` makes: runs begun, stages running, retried, recorded (with artifacts out of order,
    metrics, warnings, where they ran, gates), cached records in one batch, a lease renewed, a run finished, a
    run whose owner died marked interrupted, and hashes remembered."""
    first = history.begin_run("iris", "/srv/iris/pipeline.yaml", "f00d", "manual", "abc1234", this_host(),
                              os.getpid(), {"train.n": 300}, git_dirty=True)
    history.lease(first, interval_s=3600)
    history.mark_stage_running(first, "train", 1, T0, log_path="runs/x/train.log")
    history.record_stages(first, [StageRecord(result("train", StageStatus.FAILED, exit_code=2, reason="exit 2",
                                                     log_path=None, metrics={"r2": 0.1}), None, "1000:1000")])
    history.mark_stage_running(first, "train", 2, T0 + timedelta(minutes=1))  # a retry keeps the log
    history.record_stages(first, [
        StageRecord(result("train", attempts=2, cache_key="k1", image_id="sha256:bb", peak_memory_bytes=2**40,
                           cpu_seconds=1.5, outputs_path="runs/x/train", outputs_digest="d1", started_at=None,
                           artifacts=(Artifact("z.bin", 9, "dz"), Artifact("a.json", 1, "da")),
                           metrics={"r2": 0.4, "mae": 2.0}, warnings=("an input changed while the stage ran",),
                           ran_on=RanOn("swarm", "n2", "t1")),
                    '{"params": {"n": 1}}', "1000:1000", False, True),
        StageRecord(result("data", StageStatus.CACHED, cached_from="r0", started_at=None, finished_at=None),
                    '{"x": 1}'),
        StageRecord(result("side", StageStatus.SKIPPED, reason="upstream failed", started_at=None,
                           finished_at=None)),
    ])
    assert history.renew_lease(first) is True
    history.finish_run(first, RunStatus.SUCCEEDED, 0)
    assert history.renew_lease(first) is False
    other = history.begin_run("wine", "/srv/wine/pipeline.yaml", "beef", "schedule", None, "elsewhere", 7, {})
    history.record_stages(other, [StageRecord(result("train"))])
    history.finish_run(other, RunStatus.FAILED, 1)
    dead = history.begin_run("iris", "/srv/iris/pipeline.yaml", "f00d", "manual", None, this_host(), dead_pid, {})
    history.mark_stage_running(dead, "train", 1, T0)
    history.record_stages(dead, [StageRecord(result("data"))])
    assert history.mark_dead_runs("iris") == [dead]
    assert history.mark_dead_runs("iris") == []
    memo = history.hash_memo()
    memo.put("/data/a", (2**64 - 1, 2**63 + 5, 10, 123), "h1")
    memo.put("/data/b", (1, 2, 3, 4), "h2")
    memo.flush()
    memo.put("/data/b", (1, 2, 3, 5), "h3")  # changed since: upserted
    memo.flush()


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, in id order, with run ids numbered by first appearance and row ids replaced by what
    they point at; clock columns by their shape."""
    conn = sqlite3.connect(path)
    runs: dict[str, str] = {}
    stage_of: dict[int, tuple[str, str]] = {}
    tables: dict[str, list[tuple[Any, ...]]] = {}
    try:
        for table in ("run", "stage_run", "artifact", "metric", "file_hash", "tick", "gate_baseline",
                      "serve_event"):
            cursor = conn.execute(f"SELECT * FROM {table} ORDER BY {'rowid'}")
            names = [d[0] for d in cursor.description]
            rows = []
            for raw in cursor.fetchall():
                row = dict(zip(names, raw, strict=True))
                if table == "run":
                    row["id"] = runs.setdefault(row["id"], f"run{len(runs)}")
                if "run_id" in row and row["run_id"] is not None:
                    row["run_id"] = runs[row["run_id"]]
                if table == "stage_run":
                    stage_of[row.pop("id")] = (row["run_id"], row["stage"])
                if "stage_run_id" in row:
                    row["stage_run_id"] = stage_of[row["stage_run_id"]]
                    row.pop("id")
                for column in names:
                    if (table, column) in _CLOCK and row.get(column) is not None:
                        row[column] = re.sub(r"\d", "9", row[column])
                rows.append(tuple(sorted(row.items())))
            tables[table] = sorted(rows, key=repr) if table in ("artifact", "metric") else rows
    finally:
        conn.close()
    return tables


def test_the_writer_writes_the_rows_store_writes(tmp_path: Path) -> None:
    dead_pid = subprocess_pid()
    by_store, by_writer = tmp_path / "store.db", _new(tmp_path / "writer.db")
    with Store(f"sqlite:///{by_store}") as store:
        _story(store, dead_pid)
    with SqliteRunStore(by_writer) as writer:
        assert writer.usable
        _story(writer, dead_pid)
    expected, written = _dump(by_store), _dump(by_writer)
    assert written == expected
    assert [len(expected[t]) for t in ("run", "stage_run", "artifact", "metric", "file_hash")] == [3, 6, 2, 2, 2]
    # and Store reads back what the writer wrote as it reads its own
    with Store(f"sqlite:///{by_store}", read_only=True) as mine, \
            Store(f"sqlite:///{by_writer}", read_only=True) as theirs:
        for pipeline in ("iris", "wine"):
            assert _same_ids(theirs.list_runs(pipeline, with_stages=True)) == \
                _same_ids(mine.list_runs(pipeline, with_stages=True))
        assert theirs.hash_memo().get("/data/a", (2**64 - 1, 2**63 + 5, 10, 123)) == "h1"


def _same_ids(runs: list[Any]) -> list[Any]:
    """The runs without what the clock and the random id decide."""
    return [(r.pipeline, r.status, r.exit_code, r.trigger, r.git_dirty, r.params_override,
             tuple((s.stage, s.status, s.reason, s.attempts, s.started_at, s.finished_at, s.duration_s, s.log_path,
                    s.artifacts, s.metrics, s.warnings, s.gate_passed, s.hermetic, s.node) for s in r.stages))
            for r in runs]


def test_gate_baselines_and_liveness_answer_as_store_answers(tmp_path: Path) -> None:
    path = _new(tmp_path / "pipe.db")
    dead_pid = subprocess_pid()
    with Store(f"sqlite:///{path}") as store, SqliteRunStore(path) as writer:
        assert writer.gate_baseline("iris", "train", "r2") is None
        passed = writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, "elsewhere", 1, {})
        writer.record_stages(passed, [StageRecord(result("train", metrics={"r2": 0.8}), gate_passed=True)])
        writer.finish_run(passed, RunStatus.SUCCEEDED, 0)
        assert writer.gate_baseline("iris", "train", "r2") == store.gate_baseline("iris", "train", "r2") == \
            (passed, 0.8)
        accepted = writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, "elsewhere", 1, {})
        writer.record_stages(accepted, [StageRecord(result("train", metrics={"r2": 0.5}), gate_passed=False)])
        store.accept_gate("iris", "train", "r2", accepted, 0.5)  # accepted after the pass: the newer one
        assert writer.gate_baseline("iris", "train", "r2") == store.gate_baseline("iris", "train", "r2") == \
            (accepted, 0.5)
        mine = writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, this_host(), os.getpid(), {})
        theirs = writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, "elsewhere", 1, {})
        dead = writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, this_host(), dead_pid, {})
        for run_id, alive in ((mine, True), (theirs, True), (dead, False), (passed, False), ("nope", None)):
            assert writer.run_alive(run_id) is store.run_alive(run_id) is alive, run_id


def test_a_lease_renews_from_its_own_thread_while_stages_write(tmp_path: Path) -> None:
    path = _new(tmp_path / "pipe.db")
    with SqliteRunStore(path, lease_s=30) as writer:
        run_id = writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, this_host(), os.getpid(), {})
        before = _raw(path, run_id, "heartbeat_at")
        beat = writer.lease(run_id, interval_s=0.01)
        assert writer.lease(run_id) is beat
        threads = [threading.Thread(target=writer.record_stages, args=(run_id, [StageRecord(result(f"s{i}"))]))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = threading.Event()
        while _raw(path, run_id, "heartbeat_at") == before and not deadline.wait(0.05):
            pass  # CURRENT_TIMESTAMP has whole seconds: the first renewal in a new second shows
        writer.finish_run(run_id, RunStatus.SUCCEEDED, 0)
        assert not beat.running
    assert _raw(path, run_id, "heartbeat_at") != before
    with Store(f"sqlite:///{path}", read_only=True) as store:
        assert sorted(s.stage for s in store.get_run(run_id, "iris").stages) == [f"s{i}" for i in range(8)]


def _raw(path: Path, run_id: str, column: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT {column} FROM run WHERE id = ?", (run_id,)).fetchone()[0]
    finally:
        conn.close()


def test_a_file_that_is_absent_older_not_in_wal_or_not_pipes_is_left_to_store(tmp_path: Path) -> None:
    absent = tmp_path / "absent.db"
    assert not SqliteRunStore(absent).usable and not absent.exists()
    older = tmp_path / "v1.db"
    older.write_bytes(FIXTURE_V1.read_bytes())
    assert not SqliteRunStore(older).usable
    rollback = _new(tmp_path / "rollback.db")
    conn = sqlite3.connect(rollback)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    assert not SqliteRunStore(rollback).usable
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert not SqliteRunStore(foreign).usable
    with pytest.raises(StoreError, match="not a pipe database"):
        Store(f"sqlite:///{foreign}")  # what the run then says, in Store's words


def test_writes_to_a_run_not_in_history_are_refused_and_roll_back(tmp_path: Path) -> None:
    path = _new(tmp_path / "pipe.db")
    with SqliteRunStore(path) as writer:
        with pytest.raises(NotFound, match="run nope is not in the history database"):
            writer.record_stages("nope", [StageRecord(result("train"))])
        with pytest.raises(NotFound):
            writer.finish_run("nope", RunStatus.SUCCEEDED, 0)
        with pytest.raises(NotFound):
            writer.mark_stage_running("nope", "train", 1, T0)
        with pytest.raises(ValueError, match="trigger"):
            writer.begin_run("iris", "/p.yaml", "f00d", "cron", None, "h", 1, {})  # type: ignore[arg-type]
        run_id = writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, "h", 1, {})
        with pytest.raises(ValueError, match="naive datetime"):
            writer.mark_stage_running(run_id, "train", 1, T0.replace(tzinfo=None))
    assert _dump(path)["stage_run"] == []  # nothing of the refused writes stayed


def test_a_locked_file_is_one_store_error_line(tmp_path: Path) -> None:
    path = _new(tmp_path / "pipe.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with SqliteRunStore(path) as writer:
            writer._conn.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
            with pytest.raises(StoreError, match=r"cannot be written: database is locked$"):
                writer.begin_run("iris", "/p.yaml", "f00d", "manual", None, "h", 1, {})
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_run_uses_the_writer_once_store_has_made_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text("name: iris\nstages:\n  a:\n    image: busybox\n    command: 'true'\n")
    loaded = api.load(api.Target(folder / "pipeline.yaml"))
    with api.open_run_history(loaded) as first:
        assert isinstance(first, Store)  # no file yet: Store creates it
    with api.open_run_history(loaded) as second:
        assert isinstance(second, SqliteRunStore)
    with api.open_run_history(api.load(api.Target(folder / "pipeline.yaml", db_url=f"sqlite:///{folder}/x.db?"
                                                                                  "timeout=5"))) as other:
        assert isinstance(other, Store)  # a URL with options stays Store's
