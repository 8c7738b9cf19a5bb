"""The standard-library reader of `pipe status` (store/sqlite_reader.py) answers exactly as Store does, on the
same real SQLite files: each history below is written by Store, then read by both and compared value for value."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import StoreError
from orchestrator.executor import RanOn
from orchestrator.results import Artifact, RunStatus, StageStatus
from orchestrator.store.lease import this_host
from orchestrator.store.sqlite_reader import SqliteHistory, sqlite_path
from orchestrator.store.store import Store
from tests.unit.test_store import FIXTURE_V1, T0, begin, result, subprocess_pid


def both(path: Path, ask: Callable[[Any], Any]) -> tuple[Any, Any]:
    with Store(f"sqlite:///{path}", read_only=True) as store, SqliteHistory(path) as reader:
        return ask(store), ask(reader)


def _history(path: Path) -> None:
    """Runs of two pipelines: successes, a failure, a bare cached record, a cached one with ingredients,
    artifacts and metrics out of order, warnings, gates, where each ran."""
    with Store(f"sqlite:///{path}") as store:
        for n in range(3):
            run_id = begin(store)
            store.record_stage(run_id, result(
                "train", StageStatus.SUCCEEDED if n != 1 else StageStatus.FAILED, exit_code=0 if n != 1 else 2,
                attempts=n + 1, cache_key=f"k{n}", image_id="sha256:bb", peak_memory_bytes=2**40,
                cpu_seconds=1.5 * n, outputs_path=f"runs/{n}/train", outputs_digest=f"d{n}",
                artifacts=(Artifact("z.bin", 9, "dz"), Artifact("a.json", 1, "da")), metrics={"r2": 0.4, "mae": 2.0},
                warnings=("an input changed while the stage ran",), ran_on=RanOn("swarm", "n2", f"t{n}"),
                started_at=T0 + timedelta(minutes=n), finished_at=T0 + timedelta(minutes=n, seconds=30)),
                ingredients_json='{"params": {"n": 1}}', user="1000:1000", hermetic=n != 2, gate_passed=n == 0)
            store.record_stage(run_id, result("data", StageStatus.CACHED, cached_from="r0",
                                              started_at=None, finished_at=None),
                               ingredients_json=None if n == 2 else '{"x": 1}')
            store.finish_run(run_id, RunStatus.SUCCEEDED if n != 1 else RunStatus.FAILED, 0 if n != 1 else 1)
        other = begin(store, "wine")
        store.record_stage(other, result("train"))
        store.finish_run(other, RunStatus.SUCCEEDED, 0)


def test_the_latest_run_and_every_stages_history_read_alike(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    _history(path)
    for pipeline in ("iris", "wine", "none"):
        store_run, read_run = both(path, lambda h, p=pipeline: h.latest_run(p))
        assert read_run == store_run
        store_hist, read_hist = both(path, lambda h, p=pipeline: h.stage_histories(p))
        assert read_hist == store_hist
    latest = both(path, lambda h: h.latest_run("iris"))[1]
    assert latest is not None and latest.stage("train") is not None and latest.stage("train").artifacts[0].path == "a.json"
    excluded = both(path, lambda h: h.stage_histories("iris", exclude_run=latest.id))
    assert excluded[0] == excluded[1] and excluded[1]["train"].last_record.attempts == 2  # the failed one


def test_a_running_run_reads_alike_alive_and_once_its_owner_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    with Store(f"sqlite:///{path}") as store:
        run_id = store.begin_run("iris", "/p.yaml", "f00d", "manual", None, "elsewhere", 1, {})
        store.mark_stage_running(run_id, "train", 1, T0)
        store.record_stage(run_id, result("data"))
        alive = both(path, lambda h: h.latest_run("iris"))
        assert alive[0] == alive[1] and alive[1].status is RunStatus.RUNNING  # another host, its lease alive
    with Store(f"sqlite:///{path}") as store:  # a run of a process on this host that has ended
        dead = store.begin_run("iris", "/p.yaml", "f00d", "manual", None, this_host(), subprocess_pid(), {})
        store.mark_stage_running(dead, "train", 1, T0)
    gone = both(path, lambda h: h.latest_run("iris"))
    assert gone[0] == gone[1]
    assert gone[1].status is RunStatus.INTERRUPTED and gone[1].stage("train").reason.startswith("interrupted: ")


def test_the_hash_memo_reads_alike_with_inodes_past_2_63(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    key = (2**64 - 5, 2**63 + 7, 10, 123456789)
    with Store(f"sqlite:///{path}") as store:
        memo = store.hash_memo()
        memo.put("/data/a", key, "digest-a")
        memo.flush()
    with SqliteHistory(path) as reader:
        memo = reader.hash_memo()
        assert memo.get("/data/a", key) == "digest-a" and memo.get("/data/a", (1, 2, 3, 4)) is None
        memo.put("/data/b", key, "digest-b")
        memo.flush()
        assert memo.get("/data/b", key) == "digest-b"  # this process only
    assert sqlite3.connect(path).execute("SELECT count(*) FROM file_hash").fetchone() == (1,)


def test_serving_events_read_alike_newest_first_and_limited(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    with Store(f"sqlite:///{path}") as store:
        run_id = begin(store)
        for event, ok in (("started", True), ("promote_failed", False), ("promoted", True), ("stopped", True)):
            store.record_serve_event("iris", event, run_id, f"d-{event}", ok=ok, detail=f"why {event}")
        store.record_serve_event("iris", "promoted", "not-a-run", None)
        store.record_serve_event("wine", "started", None, None)
    for pipeline, limit in (("iris", None), ("iris", 2), ("wine", 50), ("none", None)):
        kept, read = both(path, lambda h, p=pipeline, n=limit: h.serve_events(p, limit=n))
        assert read == kept, (pipeline, limit)
    events = both(path, lambda h: h.serve_events("iris", limit=None))[1]
    assert [e.event for e in events][:2] == ["promoted", "stopped"] and events[0].run_id is None
    assert events[-2].ok is False and events[-1].detail == "why started"


def test_absent_empty_older_newer_and_foreign_files_read_as_store_reads_them(tmp_path: Path) -> None:
    absent = tmp_path / "absent.db"
    assert both(absent, lambda h: (h.latest_run("iris"), h.stage_histories("iris"))) == ((None, {}), (None, {}))
    assert not absent.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    assert both(empty, lambda h: h.latest_run("iris")) == (None, None)
    old = tmp_path / "v1.db"
    shutil.copy(FIXTURE_V1, old)
    messages = []
    for opener in (lambda: Store(f"sqlite:///{old}", read_only=True), lambda: SqliteHistory(old)):
        with pytest.raises(StoreError) as raised:
            opener()
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and "run `pipe run` once to upgrade it" in messages[1]
    newer = tmp_path / "newer.db"
    _history(newer)
    sqlite3.connect(newer, isolation_level=None).execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="has schema v99 but this pipe knows"):
        SqliteHistory(newer)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign, isolation_level=None).execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a pipe database"):
        SqliteHistory(foreign)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="cannot be opened"):
        SqliteHistory(garbage)


def test_only_a_plain_sqlite_file_url_is_read_without_store() -> None:
    assert sqlite_path("sqlite:////srv/runs/pipe.db") == Path("/srv/runs/pipe.db")
    assert sqlite_path("sqlite:///runs/pipe.db") == Path("runs/pipe.db")
    for other in ("postgresql://u@h/db", "sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=ro",
                  "sqlite:////srv/pipe.db?timeout=3"):
        assert sqlite_path(other) is None, other
