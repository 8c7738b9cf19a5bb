"""The run history store on real databases: SQLite files in tmp_path, and PostgreSQL when
PIPE_TEST_POSTGRES_URL names a server whose database the tests may empty (its `public` schema is recreated)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sqlite3
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from orchestrator.errors import NotFound, StoreError
from orchestrator.executor import RanOn
from orchestrator.results import Artifact, RunStatus, StageResult, StageStatus
from orchestrator.store import migrations
from orchestrator.store.lease import Heartbeat, Owner, gone, process_identity, this_host
from orchestrator.store.migrations import SCHEMA_VERSION
from orchestrator.store.models import Base
from orchestrator.store.store import Store
from tests.conftest import wait_for

FIXTURE_V1 = Path(__file__).resolve().parents[1] / "fixtures" / "db" / "pipe-v1.db"
POSTGRES_URL = os.environ.get("PIPE_TEST_POSTGRES_URL")
T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs' / 'pipe.db'}"
    if not POSTGRES_URL:
        pytest.skip("PIPE_TEST_POSTGRES_URL is not set")
    _reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store(url) as opened:
        yield opened


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def begin(store: Store, pipeline: str = "iris", trigger: Any = "manual") -> str:
    return store.begin_run(pipeline, f"/srv/{pipeline}/pipeline.yaml", "f00d", trigger, "abc1234", "host-1",
                           4242, {"train.n_estimators": 300})


def result(stage: str, status: StageStatus = StageStatus.SUCCEEDED, **fields: Any) -> StageResult:
    fields.setdefault("started_at", T0)
    fields.setdefault("finished_at", T0 + timedelta(seconds=90))
    return StageResult(stage=stage, status=status, **fields)


def test_run_round_trips_with_stages_artifacts_and_metrics(store: Store) -> None:
    run_id = begin(store)
    store.mark_stage_running(run_id, "train", 1, T0, log_path="runs/x/train.log")
    running = store.get_run(run_id, "iris").stage("train")
    assert running is not None and running.status is None and running.to_json()["status"] == "running"
    assert running.log_path == "runs/x/train.log"

    store.record_stage(run_id, result(
        "train", exit_code=0, attempts=2, cache_key="k-train", image_id="sha256:bb", peak_memory_bytes=2**33,
        cpu_seconds=88.5, outputs_path="runs/x/train", outputs_digest="d-out",
        artifacts=(Artifact("model.joblib", 1024, "d-model"), Artifact("card.json", 10, "d-card")),
        metrics={"r2": 0.46, "mae": 12.5}, ran_on=RanOn("swarm", "n2", "task-7")), ingredients_json='{"params": {"n": 300}}', user="1000:1000",
        hermetic=False, gate_passed=True)
    store.record_stage(run_id, result("predict", StageStatus.SKIPPED, reason="upstream evaluate failed",
                                      started_at=None, finished_at=None))
    store.finish_run(run_id, RunStatus.FAILED, 1)

    run = store.get_run(run_id, "iris")
    assert (run.pipeline, run.trigger, run.status, run.exit_code) == ("iris", "manual", RunStatus.FAILED, 1)
    assert run.params_override == {"train.n_estimators": 300} and run.git_commit == "abc1234"
    assert run.started_at.tzinfo is not None and run.finished_at is not None and run.duration_s is not None
    assert [s.stage for s in run.stages] == ["train", "predict"]
    train = run.stage("train")
    assert train is not None
    assert (train.status, train.attempts, train.exit_code, train.cache_key) == (StageStatus.SUCCEEDED, 2, 0, "k-train")
    assert train.started_at == T0 and train.duration_s == 90.0 and train.log_path == "runs/x/train.log"
    assert train.peak_memory_bytes == 2**33 and train.cpu_seconds == 88.5
    assert (train.user, train.hermetic, train.gate_passed) == ("1000:1000", False, True)
    assert set(train.artifacts) == {Artifact("model.joblib", 1024, "d-model"), Artifact("card.json", 10, "d-card")}
    assert train.metrics == {"r2": 0.46, "mae": 12.5}
    assert (train.executor, train.node, train.task_id) == ("swarm", "n2", "task-7")
    predict = run.stage("predict")
    assert predict is not None and predict.status is StageStatus.SKIPPED and predict.duration_s is None
    assert (predict.executor, predict.node, predict.task_id) == (None, None, None)  # nothing ran

    as_json = run.to_json()
    assert as_json["status"] == "failed" and as_json["started_at"].endswith("Z")
    assert as_json["stages"][0]["ingredients"] == {"params": {"n": 300}}
    assert as_json["stages"][0]["finished_at"] == "2026-11-21T23:01:30.000Z"
    assert (as_json["stages"][0]["executor"], as_json["stages"][0]["node"]) == ("swarm", "n2")


def test_record_stage_replaces_an_earlier_attempt(store: Store) -> None:
    run_id = begin(store)
    store.record_stage(run_id, result("train", StageStatus.FAILED, attempts=1, metrics={"r2": 0.1},
                                      artifacts=(Artifact("a", 1, "x"),)))
    store.mark_stage_running(run_id, "train", 2, T0)
    retrying = store.get_run(run_id, "iris").stages[0]
    assert (retrying.status, retrying.attempts, retrying.metrics, retrying.artifacts) == (None, 2, {}, ())
    store.record_stage(run_id, result("train", attempts=2, metrics={"r2": 0.5}))
    run = store.get_run(run_id, "iris")
    assert len(run.stages) == 1
    train = run.stages[0]
    assert (train.status, train.attempts, train.metrics, train.artifacts) == (StageStatus.SUCCEEDED, 2,
                                                                               {"r2": 0.5}, ())


def test_latest_and_list_filter_by_pipeline_status_and_trigger(store: Store) -> None:
    assert store.latest_run("iris") is None
    first = begin(store)
    store.finish_run(first, RunStatus.SUCCEEDED, 0)
    second = begin(store, trigger="schedule")
    store.record_stage(second, result("data", StageStatus.FAILED, reason="exit 2", exit_code=2))
    store.finish_run(second, RunStatus.FAILED, 1)
    other = begin(store, pipeline="wine")

    latest = store.latest_run("iris")
    assert latest is not None and latest.id == second and latest.stages[0].reason == "exit 2"
    assert [r.id for r in store.list_runs("iris")] == [second, first]
    assert all(r.stages == () for r in store.list_runs("iris"))
    assert [len(r.stages) for r in store.list_runs("iris", with_stages=True)] == [1, 0]
    assert [r.id for r in store.list_runs("iris", status=RunStatus.SUCCEEDED)] == [first]
    assert [r.id for r in store.list_runs("iris", trigger="schedule")] == [second]
    assert [r.id for r in store.list_runs("iris", limit=1)] == [second]
    assert [r.id for r in store.list_runs("wine")] == [other]


def test_get_run_by_id_prefix_and_latest(store: Store) -> None:
    run_id = begin(store)
    assert store.get_run(run_id, "iris").id == run_id
    assert store.get_run(run_id[:-1], "iris").id == run_id
    assert store.get_run("latest", "iris").id == run_id
    with pytest.raises(NotFound, match=r"run nope is not in the history of pipeline iris"):
        store.get_run("nope", "iris")
    with pytest.raises(NotFound, match=r"pipeline wine has no runs yet"):
        store.get_run("latest", "wine")
    with pytest.raises(NotFound):  # ids are per pipeline
        store.get_run(run_id, "wine")
    begin(store)
    with pytest.raises(NotFound, match=r"run 2 matches 2 runs of pipeline iris; give more of the id"):
        store.get_run("2", "iris")
    with pytest.raises(NotFound):  # LIKE wildcards are plain characters
        store.get_run("%", "iris")


def test_run_ids_are_unique_and_sort_by_start(store: Store) -> None:
    ids = [begin(store) for _ in range(30)]
    assert len(set(ids)) == 30
    assert ids == sorted(ids, key=lambda i: i[:15])
    assert all(len(i) == 20 for i in ids)


def test_last_success_skips_failures_and_bare_cached_records(store: Store) -> None:
    assert store.last_success("iris", "train") is None
    ran = begin(store)
    store.record_stage(ran, result("train", cache_key="k1"), ingredients_json='{"v": 1}')
    failed = begin(store)
    store.record_stage(failed, result("train", StageStatus.FAILED, cache_key="k2"), ingredients_json='{"v": 2}')
    bare = begin(store)
    store.record_stage(bare, result("train", StageStatus.CACHED, cache_key="k1"))
    found = store.last_success("iris", "train")
    assert found is not None and found.cache_key == "k1" and found.ingredients_json == '{"v": 1}'

    cached = begin(store)
    store.record_stage(cached, result("train", StageStatus.CACHED, cache_key="k3", cached_from=ran),
                       ingredients_json='{"v": 3}')
    found = store.last_success("iris", "train")
    assert found is not None and (found.cache_key, found.cached_from) == ("k3", ran)
    assert store.last_success("wine", "train") is None


def test_stage_histories_answers_every_stage_as_last_success_and_last_record_do(store: Store) -> None:
    ran = begin(store)
    for stage in ("data", "train", "eval", "flaky"):
        store.record_stage(ran, result(stage, cache_key=f"{stage}-1",
                                       artifacts=(Artifact("a", 1, "x"),), metrics={"m": 1.0}),
                           ingredients_json=f'{{"{stage}": 1}}')
    failed = begin(store)
    store.record_stage(failed, result("train", StageStatus.FAILED, exit_code=2), ingredients_json='{"t": 2}')
    store.record_stage(failed, result("never-ok", StageStatus.FAILED, exit_code=3))
    bare = begin(store)
    store.record_stage(bare, result("data", StageStatus.CACHED, cache_key="data-1"))  # no ingredients: not a success
    store.record_stage(bare, result("eval", StageStatus.CACHED, cache_key="eval-1", cached_from=ran),
                       ingredients_json='{"eval": 1}')
    store.mark_stage_running(bare, "flaky", 1, T0)  # still running: no finished record
    begin(store, pipeline="wine")
    current = begin(store)
    store.record_stage(current, result("train", StageStatus.FAILED, exit_code=9))

    stages = ("data", "train", "eval", "flaky", "never-ok", "missing")
    for exclude in (None, current):
        found = store.stage_histories("iris", exclude_run=exclude)
        assert set(found) == set(stages) - {"missing"}
        for stage in stages:
            history = found.get(stage)
            expect_record = store.last_record("iris", stage) if exclude is None else None
            if exclude is None:
                assert (history.last_record if history else None) == expect_record, stage
            assert (history.last_success if history else None) == store.last_success("iris", stage), stage
    train = store.stage_histories("iris", exclude_run=current)["train"]
    assert train.last_record is not None and train.last_record.exit_code == 2
    assert store.stage_histories("iris")["train"].last_record.exit_code == 9  # type: ignore[union-attr]
    data = store.stage_histories("iris")["data"]
    assert data.last_success is not None and data.last_success.metrics == {"m": 1.0}
    assert data.last_success.artifacts == (Artifact("a", 1, "x"),)
    assert data.last_record is not None and data.last_record.status is StageStatus.CACHED
    assert store.stage_histories("nothing-here") == {}


def test_stage_histories_is_one_query_whatever_the_number_of_stages(store: Store) -> None:
    from sqlalchemy import event

    for _ in range(3):
        run_id = begin(store)
        for i in range(40):
            store.record_stage(run_id, result(f"s{i:02d}", metrics={"m": float(i)}), ingredients_json="{}")
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    engine = store._engine  # counting what the store sends
    event.listen(engine, "before_cursor_execute", count)
    try:
        found = store.stage_histories("iris")
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(found) == 40 and all(h.last_success is not None for h in found.values())
    assert len(statements) <= 3, statements  # the stage records, then their artifacts and metrics


def test_record_stages_writes_several_stages_at_once_as_record_stage_would(store: Store) -> None:
    from orchestrator.store.store import StageRecord

    run_id = begin(store)
    store.mark_stage_running(run_id, "b", 1, T0)
    store.record_stages(run_id, [
        StageRecord(result("a", StageStatus.CACHED, cache_key="ka", cached_from="r0"), '{"a": 1}', "1:1"),
        StageRecord(result("b", metrics={"m": 2.0}), '{"b": 1}', hermetic=False, gate_passed=True),
    ])
    store.record_stages(run_id, [])
    run = store.get_run(run_id, "iris")
    assert [s.stage for s in run.stages] == ["b", "a"]
    a, b = run.stage("a"), run.stage("b")
    assert a is not None and (a.status, a.cached_from, a.user, a.ingredients_json) == (
        StageStatus.CACHED, "r0", "1:1", '{"a": 1}')
    assert b is not None and (b.status, b.metrics, b.hermetic, b.gate_passed) == (
        StageStatus.SUCCEEDED, {"m": 2.0}, False, True)
    assert store.last_success("iris", "a") is not None


def test_mark_interrupted_fails_running_stages_only(store: Store) -> None:
    run_id = begin(store)
    store.record_stage(run_id, result("data"))
    store.mark_stage_running(run_id, "train", 1, T0)
    assert [r.id for r in store.running_runs("iris")] == [run_id]

    assert store.mark_interrupted(run_id) is True
    run = store.get_run(run_id, "iris")
    assert run.status is RunStatus.INTERRUPTED and run.finished_at is not None
    data, train = run.stage("data"), run.stage("train")
    assert data is not None and data.status is StageStatus.SUCCEEDED and data.reason == ""
    assert train is not None and (train.status, train.reason) == (StageStatus.FAILED, "interrupted")
    assert train.finished_at is not None
    assert store.running_runs("iris") == []
    assert store.mark_interrupted(run_id) is False  # already finished: nothing changes


def test_unknown_run_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.finish_run("20200101-000000-0000", RunStatus.SUCCEEDED, 0)
    with pytest.raises(NotFound):
        store.record_stage("20200101-000000-0000", result("data"))


def test_metric_history_and_gate_baseline(store: Store) -> None:
    assert store.gate_baseline("iris", "evaluate", "r2") is None
    passed = begin(store)
    store.record_stage(passed, result("evaluate", metrics={"r2": 0.46, "mae": 3.0}), gate_passed=True)
    no_metrics = begin(store)
    store.record_stage(no_metrics, result("data"))
    failed_gate = begin(store)
    store.record_stage(failed_gate, result("evaluate", StageStatus.FAILED, metrics={"r2": 0.41}),
                       gate_passed=False)

    assert store.gate_baseline("iris", "evaluate", "r2") == (passed, 0.46)
    assert store.gate_baseline("iris", "evaluate", "rmse") is None
    history = store.metric_history("iris", limit=5)
    store.accept_gate("iris", "evaluate", "r2", failed_gate, 0.41)  # `pipe gate accept`: newer than the pass
    assert store.gate_baseline("iris", "evaluate", "r2") == (failed_gate, 0.41)
    assert [(p.run_id, p.name, p.value) for p in history] == [
        (failed_gate, "r2", 0.41), (passed, "mae", 3.0), (passed, "r2", 0.46)]
    assert [p.run_id for p in store.metric_history("iris", limit=1)] == [failed_gate]
    assert history[0].to_json()["stage"] == "evaluate"
    later = begin(store)  # a run that passes after the acceptance is the baseline again
    store.record_stage(later, result("evaluate", metrics={"r2": 0.44}), gate_passed=True)
    assert store.gate_baseline("iris", "evaluate", "r2") == (later, 0.44)


def test_referenced_cache_keys_keep_recent_and_running_runs(store: Store) -> None:
    for key in ("k1", "k2", "k3"):
        run_id = begin(store)
        store.record_stage(run_id, result("train", cache_key=key))
        store.finish_run(run_id, RunStatus.SUCCEEDED, 0)
    running = begin(store, pipeline="wine")
    store.record_stage(running, result("data", StageStatus.CACHED, cache_key="k0"))

    assert store.referenced_cache_keys(None, None) == {"k0", "k1", "k2", "k3"}
    assert store.referenced_cache_keys(1, None) == {"k0"}  # the newest run is the running one
    assert store.referenced_cache_keys(2, None) == {"k0", "k3"}
    assert store.referenced_cache_keys(None, 0.0) == {"k0"}
    assert store.referenced_cache_keys(None, 1.0) == {"k0", "k1", "k2", "k3"}


def test_ticks_round_trip_newest_first(store: Store) -> None:
    run_id = begin(store, trigger="schedule")
    store.record_tick("iris", T0, "fired", "", run_id)
    store.record_tick("iris", T0 + timedelta(hours=1), "skipped", "overlap: run still running")
    store.record_tick("wine", T0, "coalesced", "catch-up")
    ticks = store.ticks("iris")
    assert [(t.action, t.run_id) for t in ticks] == [("skipped", None), ("fired", run_id)]
    assert ticks[0].due_at == T0 + timedelta(hours=1)
    assert ticks[0].to_json()["due_at"] == "2026-11-22T00:00:00.000Z"
    with pytest.raises(ValueError):
        store.record_tick("iris", T0, "dropped", "")  # type: ignore[arg-type]


def test_hash_memo_round_trips_and_updates(url: str, store: Store) -> None:
    big = 2**64 - 5  # st_ino can use all 64 unsigned bits
    memo = store.hash_memo()
    assert memo.get("/data/a", (1, 2, 3, 4)) is None
    memo.put("/data/a", (1, 2, 3, 4), "d-a")
    memo.put("/data/b", (1, big, 30, 40), "d-b")
    assert memo.get("/data/a", (1, 2, 3, 4)) == "d-a"  # visible before the flush
    memo.flush()
    memo.flush()  # nothing pending: a no-op

    with Store(url) as reopened:
        again = reopened.hash_memo()
        assert again.get("/data/a", (1, 2, 3, 4)) == "d-a"
        assert again.get("/data/b", (1, big, 30, 40)) == "d-b"
        assert again.get("/data/a", (1, 2, 3, 5)) is None  # touched: the mtime differs
        again.put("/data/a", (1, 2, 3, 5), "d-a2")
        again.flush()
    with Store(url) as third:
        assert third.hash_memo().get("/data/a", (1, 2, 3, 5)) == "d-a2"


def test_hash_memo_flushes_many_rows_in_chunks(url: str, store: Store) -> None:
    memo = store.hash_memo()
    for i in range(1234):
        memo.put(f"/data/{i}", (1, i, i, i), f"d{i}")
    memo.flush()
    with Store(url) as reopened:
        again = reopened.hash_memo()
        assert all(again.get(f"/data/{i}", (1, i, i, i)) == f"d{i}" for i in range(1234))


def test_stages_recorded_from_parallel_threads(store: Store) -> None:
    run_id = begin(store)
    stages = [f"s{i}" for i in range(8)]

    def run_stage(stage: str) -> None:  # what parallel.execute does with --jobs 8
        store.mark_stage_running(run_id, stage, 1, T0)
        store.record_stage(run_id, result(stage, metrics={"m": 1.0}))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run_stage, stages))
    run = store.get_run(run_id, "iris")
    assert sorted(s.stage for s in run.stages) == stages
    assert all(s.status is StageStatus.SUCCEEDED and s.metrics == {"m": 1.0} for s in run.stages)


def _columns_and_indexes(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    found = inspect(engine)
    shape = {table: ({(c["name"], c["nullable"]) for c in found.get_columns(table)},
                     {i["name"] for i in found.get_indexes(table)}
                     | {u["name"] for u in found.get_unique_constraints(table)})
             for table in found.get_table_names() if table != "schema_version"}
    engine.dispose()
    return shape


def test_migrations_create_what_the_models_declare(url: str, store: Store) -> None:
    declared = {table.name: ({(c.name, c.nullable) for c in table.columns},
                             {i.name for i in table.indexes}
                             | {c.name for c in table.constraints if c.__class__.__name__ == "UniqueConstraint"})
                for table in Base.metadata.sorted_tables}
    assert _columns_and_indexes(url) == declared


def test_schema_v1_database_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    """tests/fixtures/db/pipe-v1.db was made once by migrations step 1 (the first release's DDL) plus a few rows;
    never regenerate it with newer code."""
    path = tmp_path / "pipe.db"
    shutil.copy(FIXTURE_V1, path)
    with Store(sqlite_url(path)) as store:
        run = store.get_run("latest", "iris")
        assert (run.id, run.trigger, run.status, run.host) == ("20261101-030000-1a2b", "schedule",
                                                               RunStatus.SUCCEEDED, "build-01")
        assert run.started_at == datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
        assert run.params_override == {"train.n_estimators": 300}
        train = run.stage("train")
        assert train is not None and train.metrics == {"r2": 0.46} and train.gate_passed is None
        assert train.artifacts == (Artifact("model.joblib", 1024, "d-model"),)
        success = store.last_success("iris", "train")
        assert success is not None and success.reason == "ran: param n_estimators 100 -> 300"
        assert store.hash_memo().get("/srv/iris/data/raw.csv", (2049, 131, 4551, 1761960000000000000)) == "d-raw"
        # what v2 added works on the upgraded file
        store.record_tick("iris", T0, "fired", "", run.id)
        assert len(store.ticks("iris")) == 1
        new = begin(store)
        store.record_stage(new, result("evaluate", metrics={"r2": 0.5}), gate_passed=True)
        assert store.gate_baseline("iris", "evaluate", "r2") == (new, 0.5)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fresh = tmp_path / "fresh.db"
    Store(sqlite_url(fresh)).close()
    assert _columns_and_indexes(sqlite_url(path)) == _columns_and_indexes(sqlite_url(fresh))


def test_v5_database_upgrades_to_v6_and_its_stages_say_nothing_of_where_they_ran(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    engine = create_engine(sqlite_url(path))
    with engine.begin() as conn:  # a database exactly as a v5 pipe left it, with one run of one stage
        migrations.upgrade(conn, 0, 5)
        conn.execute(text("INSERT INTO run (id, pipeline, pipeline_path, pipeline_hash, trigger, status, started_at,"
                          " host, pid, params_override) VALUES ('20261101-030000-1a2b', 'iris', '/p', 'h', 'manual',"
                          " 'succeeded', '2026-11-01 03:00:00', 'h1', 1, '{}')"))
        conn.execute(text("INSERT INTO stage_run (run_id, stage, status, reason, attempts, infra_error, hermetic)"
                          " VALUES ('20261101-030000-1a2b', 'train', 'succeeded', '', 1, 0, 1)"))
    engine.dispose()
    with Store(sqlite_url(path)) as store:
        train = store.get_run("latest", "iris").stage("train")
        assert train is not None and (train.executor, train.node, train.task_id) == (None, None, None)
        run_id = begin(store)
        store.record_stage(run_id, result("train", ran_on=RanOn("kubernetes", "node-a", "pipe-train-1")))
        again = store.get_run(run_id, "iris").stage("train")
    assert again is not None and (again.executor, again.node, again.task_id) == ("kubernetes", "node-a", "pipe-train-1")


def test_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    Store(sqlite_url(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 7")
    with pytest.raises(StoreError) as caught:
        Store(sqlite_url(path))
    assert str(caught.value) == f"database {path} has schema v7 but this pipe knows v{SCHEMA_VERSION}; upgrade pipe"


def test_foreign_or_damaged_database_is_a_store_error(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    with pytest.raises(StoreError, match=r"holds tables but no schema_version; it is not a pipe database"):
        Store(sqlite_url(foreign))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=rf"^database {garbage} cannot be opened: file is not a database$"):
        Store(sqlite_url(garbage))
    with pytest.raises(StoreError, match=r"uses mysql; pipe supports sqlite and postgresql"):
        Store("mysql://u@localhost/pipe")


def test_database_file_and_folder_are_private(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    with Store(sqlite_url(folder / "pipe.db")) as store:
        begin(store)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert modes["pipe.db"] == 0o600 and modes["pipe.db-wal"] == 0o600, modes


def _write_runs(url: str, name: str, count: int, start: Any, errors: Any) -> None:
    try:
        start.wait(30)
        with Store(url) as store:
            memo = store.hash_memo()
            for i in range(count):
                run_id = begin(store, pipeline="shared")
                for stage in ("data", "train", "evaluate"):
                    store.mark_stage_running(run_id, stage, 1, datetime.now(UTC))
                    store.record_stage(run_id, result(stage, cache_key=f"{name}-{i}-{stage}",
                                                      metrics={"r2": i / count}))
                memo.put(f"/data/{i % 7}", (1, i, 1, 1), f"{name}-{i}")
                memo.flush()
                store.finish_run(run_id, RunStatus.SUCCEEDED, 0)
    except BaseException as e:
        errors.put(f"{name}: {type(e).__name__}: {e}")
        raise


def _read_runs(url: str, start: Any, writers_done: Any, errors: Any, reads: Any) -> None:
    try:
        start.wait(30)
        count = 0
        with Store(url) as store:
            while not writers_done.is_set() or count == 0:
                store.latest_run("shared")
                store.list_runs("shared", limit=5)
                store.last_success("shared", "train")
                store.metric_history("shared", 3)
                count += 1
        reads.put(count)
    except BaseException as e:
        errors.put(f"reader: {type(e).__name__}: {e}")
        raise


def test_two_writer_processes_and_a_reader_neither_fail_nor_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "pipe.db"
    url = sqlite_url(path)
    ctx = multiprocessing.get_context("spawn")
    start, writers_done = ctx.Event(), ctx.Event()
    errors, reads = ctx.Queue(), ctx.Queue()
    count = 20
    writers = [ctx.Process(target=_write_runs, args=(url, name, count, start, errors)) for name in ("a", "b")]
    reader = ctx.Process(target=_read_runs, args=(url, start, writers_done, errors, reads))
    for process in (*writers, reader):
        process.start()
    start.set()
    for process in writers:
        process.join(120)
    writers_done.set()
    reader.join(60)
    problems = [errors.get() for _ in range(errors.qsize())]
    assert problems == []
    assert [p.exitcode for p in (*writers, reader)] == [0, 0, 0]
    assert reads.get(timeout=5) > 0

    with Store(url) as store:
        runs = store.list_runs("shared", limit=1000, with_stages=True)
        assert len(runs) == 2 * count and len({r.id for r in runs}) == 2 * count
        assert all(r.status is RunStatus.SUCCEEDED and len(r.stages) == 3 for r in runs)
        assert len(store.referenced_cache_keys(None, None)) == 2 * count * 3
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _open_fresh_databases(urls: list[str], barrier: Any, errors: Any) -> None:
    for url in urls:
        barrier.wait(30)  # every process opens the same new file at the same instant
        try:
            Store(url).close()
        except StoreError as e:
            errors.put(f"{url}: {type(e).__name__}: {e}")


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    """The first open switches the new file to WAL; SQLite refuses racing switches without waiting (before the
    switch was retried, about one new file in ten failed here, and the scheduler's e2e test with it)."""
    urls = [sqlite_url(tmp_path / f"db{i}" / "pipe.db") for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    processes = 6
    barrier, errors = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_open_fresh_databases, args=(urls, barrier, errors)) for _ in range(processes)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [errors.get() for _ in range(errors.qsize())] == []
    assert [p.exitcode for p in workers] == [0] * processes
    for url in urls:
        with Store(url) as store:
            assert store.list_runs("any", limit=1) == []


def _begin_and_hang(url: str, ready: Any) -> None:
    """A `pipe run` elsewhere on this machine (another checkout, another state dir): it begins a run on the shared
    database, renews its lease, and hangs until killed."""
    with Store(url) as store:
        run_id = begin_here(store)
        store.lease(run_id, interval_s=0.2)
        store.mark_stage_running(run_id, "train", 1, datetime.now(UTC))
        ready.put(run_id)
        while True:
            time.sleep(1)  # until SIGKILL


def begin_here(store: Store, pipeline: str = "iris") -> str:
    """A run owned by this process on this host, as api.run_pipeline begins one."""
    return store.begin_run(pipeline, f"/srv/{pipeline}/pipeline.yaml", "f00d", "manual", None, this_host(),
                           os.getpid(), {})


def raw_run(url: str, run_id: str) -> dict[str, Any]:
    """The run's row as stored, not as the store answers it."""
    engine = create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT status, heartbeat_at, lease_expires_at, owner_process FROM run "
                                "WHERE id = :id"), {"id": run_id}).mappings().one()
    engine.dispose()
    return dict(row)


def test_a_live_run_of_another_process_on_the_shared_database_stays_running_until_it_dies(url: str) -> None:
    """Issue 14: `pipe status` in one checkout marked another checkout's live run (same pipeline name, shared
    --db) interrupted, because its own flock was free. Now the run's lease decides, and a reader never writes."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    process = ctx.Process(target=_begin_and_hang, args=(url, ready))
    process.start()
    try:
        run_id = ready.get(timeout=60)
        with Store(url, read_only=True) as reader:
            [running] = reader.running_runs("iris")
            assert running.id == run_id and running.status is RunStatus.RUNNING
        with Store(url) as writer:  # what `pipe run` in the other checkout does when it starts
            assert writer.mark_dead_runs("iris") == []
            assert writer.get_run(run_id, "iris").status is RunStatus.RUNNING
    finally:
        os.kill(process.pid or 0, signal.SIGKILL)
        process.join(30)
    assert process.exitcode == -signal.SIGKILL

    with Store(url, read_only=True) as reader:  # same host, its pid has ended: provably gone, shown at once
        run = reader.get_run(run_id, "iris")
        assert run.status is RunStatus.INTERRUPTED and reader.running_runs("iris") == []
        assert [r.id for r in reader.list_runs("iris", status=RunStatus.INTERRUPTED)] == [run_id]
        assert reader.list_runs("iris", status=RunStatus.RUNNING) == []
        train = run.stage("train")
        assert train is not None and train.status is StageStatus.FAILED
        assert train.reason == f"interrupted: its process {process.pid} on {this_host()} has ended"
    assert raw_run(url, run_id)["status"] == "running", "a read marks nothing"
    with Store(url) as writer:
        assert writer.mark_dead_runs("iris") == [run_id]
        marked = writer.get_run(run_id, "iris")
    assert raw_run(url, run_id)["status"] == "interrupted"
    assert marked.stage("train") == train and marked.finished_at == run.finished_at  # as it was shown


def test_a_run_on_another_host_is_dead_only_when_its_lease_expires(url: str) -> None:
    with Store(url, lease_s=2) as other_host:
        run_id = begin(other_host)  # host-1, pid 4242: nothing here can tell whether it lives
        with Store(url, read_only=True) as reader:
            assert reader.get_run(run_id, "iris").status is RunStatus.RUNNING
            assert reader.run_alive(run_id) is True
            expires = raw_run(url, run_id)["lease_expires_at"]
            run = wait_for(lambda: (r := reader.get_run(run_id, "iris")).status is RunStatus.INTERRUPTED and r,
                           timeout=30, what="the lease to expire")
            assert reader.run_alive(run_id) is False and reader.run_alive("20200101-000000-0000") is None
        assert run.finished_at is not None and run.finished_at < datetime.now(UTC)
        assert expires is not None
        assert other_host.mark_dead_runs("iris") == [run_id]


def test_the_heartbeat_keeps_a_lease_alive_and_never_writes_after_the_run_ended(url: str) -> None:
    with Store(url, lease_s=3) as store:
        run_id = begin(store)  # another host's run: only the lease keeps it alive
        first = raw_run(url, run_id)
        heartbeat = store.lease(run_id, interval_s=0.1)
        assert store.lease(run_id) is heartbeat  # one per run
        with Store(url, read_only=True) as reader:
            wait_for(lambda: raw_run(url, run_id)["heartbeat_at"] > first["lease_expires_at"], timeout=30,
                     what="a renewal after the first lease would have expired")
            assert reader.get_run(run_id, "iris").status is RunStatus.RUNNING
            assert reader.run_alive(run_id) is True
        store.finish_run(run_id, RunStatus.SUCCEEDED, 0)
        assert not heartbeat.running
        ended = raw_run(url, run_id)
        assert store.renew_lease(run_id) is False, "a finished run's lease is never renewed"
        assert raw_run(url, run_id) == ended
        assert store.get_run(run_id, "iris").status is RunStatus.SUCCEEDED


def test_closing_the_store_stops_the_heartbeat(url: str) -> None:
    store = Store(url)
    run_id = begin_here(store)
    with store.lease(run_id, interval_s=0.05) as heartbeat:
        assert heartbeat.running
    assert not heartbeat.running
    again = store.lease(run_id, interval_s=0.05)
    store.close()
    assert not again.running


def test_a_heartbeat_that_fails_logs_and_retries_without_reaching_the_run(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def renew() -> bool:
        calls.append(1)
        if len(calls) <= 2:
            raise StoreError("database pipe.db cannot be written: database is locked")
        return True

    with caplog.at_level(logging.WARNING, logger="orchestrator.store.lease"):
        with Heartbeat(renew, "r1", interval_s=0.01) as heartbeat:
            wait_for(lambda: len(calls) >= 4, timeout=30, what="renewals after the failures")
            assert heartbeat.running
        assert not heartbeat.running
        stopped_at = len(calls)
    assert len(calls) == stopped_at, "no renewal after stop()"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == ("run r1: renewing its lease failed (retrying every 0.01s): "
                           "database pipe.db cannot be written: database is locked")
    assert messages[1] == "run r1: its lease is renewed again" and len(messages) == 2

    ended = Heartbeat(lambda: False, "r2", interval_s=0.01).start()  # the run is no longer running: it ends
    wait_for(lambda: not ended.running, timeout=30, what="the heartbeat to end")


def test_an_owner_on_this_host_is_gone_when_its_pid_ends_or_is_reused() -> None:
    now = datetime.now(UTC)
    later = now + timedelta(minutes=1)
    me = process_identity(os.getpid())
    assert me is not None and me == process_identity(os.getpid())
    assert gone(Owner(this_host(), os.getpid(), me, later), now) is None
    reused = me.rpartition("/")[0] + "/1"  # this pid, but a process that started at another time
    assert gone(Owner(this_host(), os.getpid(), reused, later), now) == (
        f"its process {os.getpid()} on {this_host()} has ended (the pid now belongs to another process)")
    ended = subprocess_pid()
    assert gone(Owner(this_host(), ended, me.rpartition("/")[0] + "/7", later), now) == (
        f"its process {ended} on {this_host()} has ended")
    assert gone(Owner(this_host(), ended, None, later), now) == f"its process {ended} on {this_host()} has ended"
    assert gone(Owner(this_host(), os.getpid(), None, later), now) is None  # a row from before schema v3
    assert gone(Owner("elsewhere", ended, reused, later), now) is None  # another host: only the lease tells
    assert gone(Owner("elsewhere", ended, reused, now), later) == (
        f"its lease expired at {now:%Y-%m-%d %H:%M:%S} UTC")
    other_machine = "another-boot/pid:[1]/" + me.rpartition("/")[2]
    assert gone(Owner(this_host(), ended, other_machine, later), now) is None  # rebooted, or another namespace


def subprocess_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    done = multiprocessing.get_context("spawn").Process(target=int)
    done.start()
    done.join(30)
    assert done.pid is not None and process_identity(done.pid) is None
    return done.pid


def test_read_only_store_creates_nothing_and_reads_absent_history_as_empty(url: str, tmp_path: Path) -> None:
    absent = tmp_path / "nothing" / "pipe.db"
    with Store(sqlite_url(absent), read_only=True) as empty:
        assert empty.latest_run("iris") is None and empty.list_runs("iris") == [] and empty.ticks("iris") == []
        assert empty.hash_memo().get("/data/a", (1, 2, 3, 4)) is None
        with pytest.raises(NotFound, match=r"pipeline iris has no runs yet"):
            empty.get_run("latest", "iris")
        with pytest.raises(StoreError, match=r"was opened read-only; only `pipe run` writes history"):
            begin(empty)
    assert not absent.parent.exists()

    if url.startswith("postgresql"):  # an empty PostgreSQL database: no tables are created by a read
        with Store(url, read_only=True) as empty:
            assert empty.list_runs("iris") == []
        engine = create_engine(url)
        assert inspect(engine).get_table_names() == []
        engine.dispose()
    with Store(url) as store:
        run_id = begin(store)
    with Store(url, read_only=True) as reader:
        memo = reader.hash_memo()
        memo.put("/data/a", (1, 2, 3, 4), "d-a")
        memo.flush()  # read-only: kept in this process, never written
        assert memo.get("/data/a", (1, 2, 3, 4)) == "d-a"
        assert reader.get_run(run_id, "iris").status is RunStatus.RUNNING
        with pytest.raises(StoreError, match=r"opened read-only"):
            reader.finish_run(run_id, RunStatus.SUCCEEDED, 0)
    with Store(url) as store:
        assert store.hash_memo().get("/data/a", (1, 2, 3, 4)) is None


def test_read_only_store_refuses_an_older_schema_in_one_line_and_leaves_it_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    shutil.copy(FIXTURE_V1, path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        Store(sqlite_url(path), read_only=True)
    assert str(caught.value) == f"history {path} is schema v1; run `pipe run` once to upgrade it to v{SCHEMA_VERSION}"
    assert path.read_bytes() == before and not (tmp_path / "pipe.db-wal").exists()


def test_upgrade_to_v3_gives_a_running_run_a_lease_from_the_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    shutil.copy(FIXTURE_V1, path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE run SET status = 'running', host = 'elsewhere', finished_at = NULL")
    with Store(sqlite_url(path)) as store:
        run = store.get_run("latest", "iris")
        assert run.status is RunStatus.RUNNING  # its pipe may still run elsewhere: not taken for dead at once
        row = raw_run(sqlite_url(path), run.id)
        assert row["heartbeat_at"] is not None and row["lease_expires_at"] is not None
        assert row["owner_process"] is None


def test_run_of_a_killed_process_is_found_running_and_marked_interrupted(tmp_path: Path) -> None:
    """A run from before schema v3 names only its host and pid: a dead pid on this host is gone."""
    url = sqlite_url(tmp_path / "pipe.db")
    with Store(url) as store:
        ended = subprocess_pid()
        run_id = store.begin_run("iris", "/srv/iris/pipeline.yaml", "f00d", "manual", None, this_host(), ended, {})
        store.mark_stage_running(run_id, "train", 1, datetime.now(UTC))
    with sqlite3.connect(tmp_path / "pipe.db") as conn:
        conn.execute("UPDATE run SET owner_process = NULL, heartbeat_at = NULL, lease_expires_at = NULL")
    with Store(url) as store:
        assert store.running_runs("iris") == []
        assert store.mark_dead_runs("iris") == [run_id]
        train = store.get_run(run_id, "iris").stage("train")
        assert train is not None and (train.status, train.reason) == (
            StageStatus.FAILED, f"interrupted: its process {ended} on {this_host()} has ended")
