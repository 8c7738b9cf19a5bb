"""The history commands against a database filled by real runs (issue 4): status, runs/history, show, logs (and
-f), dag, metrics, two pipelines sharing one database at once, and the resource figures of a stage."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.hashing import hash_file
from orchestrator.store.migrations import SCHEMA_VERSION
from tests.conftest import BUSYBOX, wait_for
from tests.e2e.helpers import containers_created, pipe, pipe_json, start_pipe
from tests.e2e.test_run import HANDOFF
from tests.unit.test_store import POSTGRES_URL, _reset_postgres

# A stage that says "waiting" and blocks until the test creates gate/go: "running" without any timing.
GATED = "echo waiting; while [ ! -f gate/go ]; do sleep 0.1; done; echo released; echo done > /outputs/done.txt"


class Lines:
    """Collects a process's output lines in a thread, so a test can wait for one with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.lines: list[str] = []
        stream = proc.stdout
        threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True).start()

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout: float = 60) -> None:
        wait_for(lambda: self.has(text), timeout=timeout, what=f"{text!r} in {self.lines!r}")


def run_json(*args: str | Path) -> dict[str, Any]:
    """`pipe run ... --json`: its stdout is the summary alone (progress goes elsewhere)."""
    done = pipe("run", *args, "--json")
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["exit_code"] == done.returncode, done.stderr
    return report


def test_status_reports_each_stage_and_predicts_the_next_run(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "status\n"})
    run_id = run_json(path)["run_id"]
    since = time.time()
    report = pipe_json("status", path)
    assert report["pipeline"] == "project"
    assert report["run"]["id"] == run_id and report["run"]["status"] == "succeeded"
    assert set(report["stages"]) == {"data", "train", "evaluate"}
    for name, stage in report["stages"].items():
        assert stage["status"] == "succeeded", name
        assert stage["reason"] == "ran: never ran", name
        assert stage["exit_code"] == 0, name
        assert isinstance(stage["duration_s"], float) and stage["duration_s"] >= 0, name
        assert stage["outputs_path"] == str(path.parent / "runs" / run_id / name)
        assert Path(stage["outputs_path"]).is_dir()
        assert stage["cached_from"] is None
    assert {name: (s["status"], s["runs"], s["reasons"]) for name, s in report["next_run"].items()} == {
        name: ("cached", False, [f"cached from run {run_id}"]) for name in ("data", "train", "evaluate")
    }
    assert {name: s["cache_key"] for name, s in report["next_run"].items()} == {
        s["stage"]: s["cache_key"] for s in report["run"]["stages"]}

    (path.parent / "raw.txt").write_text("changed\n")
    report = pipe_json("status", path)
    assert report["next_run"]["data"]["runs"] is True
    [why] = report["next_run"]["data"]["reasons"]
    assert re.fullmatch(r"input raw\.txt changed \([0-9a-f]{8}\.\. -> [0-9a-f]{8}\.\.\)", why), why
    train = report["next_run"]["train"]
    assert (train["status"], train["runs"], train["reasons"]) == ("would_run", True, ["upstream data runs first"])
    text = pipe("status", path)
    assert text.returncode == 0, text.stderr
    assert f"run {run_id} (manual) succeeded" in text.stdout
    assert re.search(r"^\s*train\s+succeeded\b", text.stdout, re.MULTILINE), text.stdout
    assert "next run:" in text.stdout and f"data: runs: {why}" in text.stdout
    assert containers_created(docker, path.parent / "runs", since) == 0, "status starts nothing"


def test_run_json_is_the_summary_alone(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "json\n"})
    report = run_json(path)
    assert report["status"] == "succeeded" and report["exit_code"] == 0
    assert {n: s["status"] for n, s in report["stages"].items()} == dict.fromkeys(HANDOFF["stages"], "succeeded")


def test_runs_lists_newest_first_and_filters(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "runs\n"})
    first = run_json(path)["run_id"]
    scheduled = run_json(path, "--trigger", "schedule")["run_id"]
    path.write_text(path.read_text().replace("wc -c <", "exit 4; wc -c <"))
    failed = run_json(path)
    assert failed["exit_code"] == 1
    newest_first = [failed["run_id"], scheduled, first]

    listed = pipe_json("runs", path)
    assert [r["id"] for r in listed] == newest_first
    assert [r["status"] for r in listed] == ["failed", "succeeded", "succeeded"]
    assert [r["trigger"] for r in listed] == ["manual", "schedule", "manual"]
    assert listed[0]["exit_code"] == 1 and listed[0]["finished_at"] is not None
    assert pipe_json("history", path) == listed
    assert [r["id"] for r in pipe_json("runs", path, "--status", "failed")] == [failed["run_id"]]
    assert [r["id"] for r in pipe_json("runs", path, "--status", "succeeded")] == [scheduled, first]
    assert [r["id"] for r in pipe_json("runs", path, "--trigger", "schedule")] == [scheduled]
    assert [r["id"] for r in pipe_json("runs", path, "--trigger", "manual", "--limit", "1")] == [failed["run_id"]]
    assert [r["id"] for r in pipe_json("history", path, "-n", "2")] == newest_first[:2]

    text = pipe("runs", path)
    assert text.returncode == 0, text.stderr
    rows = [line for line in text.stdout.splitlines() if re.match(r"\s*\d{8}-\d{6}-", line)]
    assert [row.split()[0] for row in rows] == newest_first
    assert "schedule" in rows[1] and "failed" in rows[0]
    bad = pipe("runs", path, "--status", "exploded")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "unknown status 'exploded'" in bad.stderr


def test_show_a_run_by_prefix_and_latest_with_artifacts_and_metrics(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "show me\n"})
    run_id = run_json(path)["run_id"]
    by_prefix = pipe_json("show", run_id[:15], path)  # date and time: unique in a history of one run
    assert by_prefix == pipe_json("show", "latest", path)
    assert by_prefix["id"] == run_id and by_prefix["status"] == "succeeded"
    stages = {s["stage"]: s for s in by_prefix["stages"]}
    for name, stage in stages.items():
        assert stage["artifacts"], name
        for a in stage["artifacts"]:
            file = Path(stage["outputs_path"]) / a["path"]
            assert a["size"] == file.stat().st_size
            assert a["digest"] == hash_file(file)
    assert [a["path"] for a in stages["evaluate"]["artifacts"]] == ["metrics.json", "score.txt"]
    assert stages["evaluate"]["metrics"] == {"size": 8.0}

    text = pipe("show", "latest", path)
    assert text.returncode == 0, text.stderr
    assert f"run {run_id}" in text.stdout
    model = next(a for a in stages["train"]["artifacts"] if a["path"] == "model.txt")
    assert re.search(rf"model\.txt\s+8 ?B\s+{model['digest'][:12]}", text.stdout), text.stdout
    assert "size = 8" in text.stdout

    second = run_json(path)["run_id"]
    assert pipe_json("show", second, path)["id"] == second
    ambiguous = pipe("show", "2", path)
    assert ambiguous.returncode == 2 and "matches 2 runs" in ambiguous.stderr
    missing = pipe("show", "19990101", path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "run 19990101 is not in the history" in missing.stderr


def test_logs_prints_a_stage_log_and_refuses_an_unknown_stage(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "logs\n"})
    run_json(path)
    done = pipe("logs", "latest", "data", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["data done"]
    unknown = pipe("logs", "latest", "trian", path)
    assert unknown.returncode == 2
    lines = unknown.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'trian'" in lines[0], unknown.stderr


def test_logs_follow_streams_a_running_stage_until_it_ends(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"slow": {"image": BUSYBOX, "command": GATED, "inputs": ["gate"]}}},
                         files={"gate/README": "create go here to let the stage finish\n"})
    run = Lines(start_pipe("run", path))
    try:
        run.wait_for("slow | waiting")
        follow = Lines(start_pipe("logs", "latest", "slow", path, "-f"))
        follow.wait_for("waiting")
        assert follow.proc.poll() is None, "a follower of a running stage keeps following"
        assert not follow.has("released")
        (path.parent / "gate" / "go").write_text("")
        follow.wait_for("released")
        assert follow.proc.wait(timeout=60) == 0, follow.lines
        assert run.proc.wait(timeout=60) == 0, run.lines
        assert [line.rstrip("\n") for line in follow.lines] == ["waiting", "released"]
    finally:
        (path.parent / "gate" / "go").write_text("")
        run.proc.wait(timeout=60)


DIAMOND = {
    "stages": {
        "prepare": {"image": BUSYBOX, "command": "true"},
        "left": {"image": BUSYBOX, "command": "true", "needs": ["prepare"]},
        "right": {"image": BUSYBOX, "command": "true", "needs": ["prepare"]},
        "join": {"image": BUSYBOX, "command": "true", "needs": ["left", "right"]},
        "alone": {"image": BUSYBOX, "command": "true"},
    }
}
EDGES = {("prepare", "left"), ("prepare", "right"), ("left", "join"), ("right", "join")}


def test_dag_as_text_mermaid_and_dot(make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(DIAMOND)
    text = pipe("dag", path)
    assert text.returncode == 0, text.stderr
    lines = {line.split()[0]: line for line in text.stdout.splitlines() if line.strip()}
    assert set(lines) == set(DIAMOND["stages"])
    assert re.search(r"<-\s*left, right$", lines["join"]) and "<-" not in lines["alone"]

    mermaid = pipe("dag", path, "--format", "mermaid")
    assert mermaid.returncode == 0, mermaid.stderr
    assert mermaid.stdout.startswith("flowchart")
    ids = dict(re.findall(r'^\s*(\w+)\["([^"]+)"\]', mermaid.stdout, re.MULTILINE))
    assert set(ids.values()) == set(DIAMOND["stages"])
    assert {(ids[a], ids[b]) for a, b in re.findall(r"^\s*(\w+) --> (\w+)", mermaid.stdout, re.MULTILINE)} == EDGES

    dot = pipe("dag", path, "--format", "dot")
    assert dot.returncode == 0, dot.stderr
    assert re.match(r"\s*digraph\b[^{]*\{", dot.stdout) and dot.stdout.rstrip().endswith("}")
    assert set(re.findall(r'"([^"]+)"\s*->\s*"([^"]+)"', dot.stdout)) == EDGES
    assert set(re.findall(r'^\s*"([^"]+)"\s*;', dot.stdout, re.MULTILINE)) == set(DIAMOND["stages"])

    bad = pipe("dag", path, "--format", "png")
    assert bad.returncode == 2 and "unknown format 'png'" in bad.stderr


def test_metrics_across_runs_and_diff(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {"evaluate": {
        "image": BUSYBOX, "command": "cp /pipe/params.json /outputs/metrics.json",
        "params": {"accuracy": 0.5, "loss": 2}, "metrics": "metrics.json",
    }}})
    first = run_json(path)["run_id"]
    second = run_json(path, "-p", "evaluate.accuracy=0.75", "-p", "evaluate.loss=1.5")["run_id"]
    table = pipe_json("metrics", path)  # newest first, with params and status, as `pipe runs`
    assert [(r["run_id"], r["status"], r["metrics"], r["params"]) for r in table] == [
        (second, "succeeded", {"evaluate.accuracy": 0.75, "evaluate.loss": 1.5},
         {"evaluate.accuracy": 0.75, "evaluate.loss": 1.5}),
        (first, "succeeded", {"evaluate.accuracy": 0.5, "evaluate.loss": 2.0},
         {"evaluate.accuracy": 0.5, "evaluate.loss": 2}),
    ]
    assert pipe_json("metrics", path, "--diff") == [  # --diff keeps its oldest-first form
        {"run_id": first, "metrics": {"evaluate.accuracy": 0.5, "evaluate.loss": 2.0}},
        {"run_id": second, "metrics": {"evaluate.accuracy": 0.75, "evaluate.loss": 1.5}},
    ]
    plain = pipe("metrics", path)
    assert plain.returncode == 0, plain.stderr
    assert "evaluate.accuracy" in plain.stdout and "+0.25" not in plain.stdout
    diff = pipe("metrics", path, "--diff")
    assert diff.returncode == 0, diff.stderr
    row = next(line for line in diff.stdout.splitlines() if line.strip().startswith(second))
    assert "0.75 (+0.25)" in row and "1.5 (-0.5)" in row


def test_two_pipelines_share_one_database_at_the_same_time(
    docker: Any, make_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    files = {"gate/README": "create go here\n"}
    one = make_pipeline({"stages": {"work": {"image": BUSYBOX, "command": GATED, "inputs": ["gate"]}}}, files=files)
    other_root = tmp_path / "other"
    (other_root / "gate").mkdir(parents=True)
    (other_root / "gate" / "README").write_text(files["gate/README"])
    two = other_root / "pipeline.yaml"
    two.write_text(json.dumps({"stages": {"work": {"image": BUSYBOX, "command": GATED, "inputs": ["gate"]}}}))

    runs = [Lines(start_pipe("run", p, "--db", db)) for p in (one, two)]
    try:
        for run in runs:
            run.wait_for("work | waiting")
        for path, name in ((one, "project"), (two, "other")):  # both hold a stage running; status answers
            report = pipe_json("status", path, "--db", db)
            assert report["pipeline"] == name
            assert report["run"]["status"] == "running", report["run"]
            assert report["stages"]["work"]["status"] == "running"
    finally:
        for path in (one, two):
            (path.parent / "gate" / "go").write_text("")
    for run in runs:
        assert run.proc.wait(timeout=120) == 0, run.lines
    for path, name in ((one, "project"), (two, "other")):
        [only] = pipe_json("runs", path, "--db", db)
        assert only["pipeline"] == name and only["status"] == "succeeded"
    assert not (one.parent / "runs" / "pipe.db").exists(), "--db replaces the default database"


def test_peak_memory_cpu_seconds_and_where_it_ran_are_recorded(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    busy = "end=$(( $(date +%s) + 3 )); while [ $(date +%s) -lt $end ]; do :; done; echo spun"
    path = make_pipeline({"stages": {"spin": {"image": BUSYBOX, "command": busy}}})
    run_json(path)
    stage = pipe_json("show", "latest", path)["stages"][0]
    assert stage["status"] == "succeeded"
    assert stage["peak_memory_bytes"] is not None and stage["peak_memory_bytes"] > 0, stage
    assert stage["cpu_seconds"] is not None and stage["cpu_seconds"] > 0, stage
    # where it ran: this engine, by the name it gives itself, and the container that ran it
    assert (stage["executor"], stage["node"]) == ("local", docker.info()["Name"]), stage
    assert stage["task_id"] and len(stage["task_id"]) == 64, stage
    show = pipe("show", "latest", path)
    assert f"local on {stage['node']}" in show.stdout, show.stdout


def _shared_db(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'pipe.db'}"
    if not POSTGRES_URL:
        pytest.skip("PIPE_TEST_POSTGRES_URL is not set")
    _reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_checkout_leaves_the_live_run_of_another_checkout_on_a_shared_database_alone(
    docker: Any, tmp_path: Path, backend: str
) -> None:
    """Issue 14: `pipe status` in checkout A marked checkout B's live run (same `name:`, shared --db) as
    interrupted, because A's own lock was free. The run's lease decides now; a killed run still reads as
    interrupted at once (its process on this host has ended)."""
    db = _shared_db(backend, tmp_path)
    checkouts = {}
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "gate").mkdir(parents=True)
        (root / "gate" / "README").write_text("create go here\n")
        (root / "pipeline.yaml").write_text(json.dumps({"name": "shared", "stages": {
            "work": {"image": BUSYBOX, "command": GATED, "inputs": ["gate"]}}}))
        checkouts[name] = root / "pipeline.yaml"
    a, b = checkouts["a"], checkouts["b"]

    run_b = Lines(start_pipe("run", b, "--db", db))
    try:
        run_b.wait_for("work | waiting")
        report = pipe_json("status", a, "--db", db)
        assert report["run"]["status"] == "running", report["run"]
        assert report["stages"]["work"]["status"] == "running"
        [listed] = pipe_json("runs", a, "--db", db)
        assert listed["status"] == "running"
        (a.parent / "gate" / "go").write_text("")
        done = pipe("run", a, "--db", db)  # a writer: marks dead runs when it starts, and B's is not dead
        assert done.returncode == 0, done.stdout + done.stderr
        statuses = {r["pipeline_path"]: r["status"] for r in pipe_json("runs", a, "--db", db)}
        assert statuses == {str(a): "succeeded", str(b): "running"}
    finally:
        (b.parent / "gate" / "go").write_text("")
    assert run_b.proc.wait(timeout=120) == 0, run_b.lines
    assert [r["status"] for r in pipe_json("runs", a, "--db", db)] == ["succeeded", "succeeded"]

    (b.parent / "gate" / "go").unlink()
    killed = Lines(start_pipe("run", b, "--db", db, "--force"))
    killed.wait_for("work | waiting")
    killed.proc.kill()
    killed.proc.wait(timeout=30)
    report = pipe_json("status", a, "--db", db)
    assert report["run"]["status"] == "interrupted", report["run"]
    assert report["stages"]["work"]["reason"] == (
        f"interrupted: its process {killed.proc.pid} on {socket.gethostname()} has ended")
    (b.parent / "gate" / "go").write_text("")
    done = pipe("run", b, "--db", db)  # sweeps the killed run's container: its lease is dead
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["status"] for r in pipe_json("runs", a, "--db", db)][:2] == ["succeeded", "interrupted"]


def test_read_commands_create_migrate_and_write_nothing(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(HANDOFF, files={"raw.txt": "first\n"})
    state = path.parent / "runs"
    for command in (("status",), ("runs",), ("metrics",), ("cache", "ls")):
        done = pipe(*command, path)
        assert done.returncode == 0, (command, done.stderr)
        assert not state.exists(), f"`pipe {' '.join(command)}` created {state}"
    assert pipe("show", "latest", path).returncode == 2

    run_json(path)
    db = state / "pipe.db"

    def stored() -> list[Any]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT path, digest FROM file_hash ORDER BY path").fetchall()

    memo = stored()
    assert memo, "a run remembers its input hashes"
    (path.parent / "raw.txt").write_text("second\n")
    report = pipe_json("status", path)
    assert report["next_run"]["data"]["runs"] is True
    assert stored() == memo, "status hashed the changed input but wrote nothing"
    with sqlite3.connect(db) as conn:  # an older schema is not upgraded by a read, but named in one line
        conn.execute("UPDATE schema_version SET version = 2")
    done = pipe("status", path)
    assert done.returncode == 4
    assert done.stderr.strip() == \
        f"error: history {db} is schema v2; run `pipe run` once to upgrade it to v{SCHEMA_VERSION}"
