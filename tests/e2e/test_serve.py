"""Serving on real containers and real HTTP on loopback: up, a swap under load with zero failed requests, a model
that never becomes healthy keeps the old one serving (recorded, notified), gate-failed runs refused, rollback,
down leaves nothing, and recovery after SIGKILL of the pipe that was swapping.

The model is busybox's httpd serving the files the `train` stage wrote (`health`, `metadata`), so a test needs no
Python image: a model without a `health` file answers 404 there, which is an unhealthy model.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator import api, serve_proxy
from orchestrator.events import NullReporter
from orchestrator.serve_docker import LABEL_SERVE_OWNER, LABEL_SERVE_ROLE, slug
from tests.conftest import wait_for
from tests.e2e.helpers import pipe, start_pipe
from tests.e2e.test_schedule import FastClock

TRAIN = ("cp /workspace/model.txt /outputs/metadata; "
         "mkdir /outputs/cgi-bin && cp /workspace/meta.cgi /outputs/cgi-bin/meta && chmod 755 /outputs/cgi-bin/meta; "
         "if grep -q healthy /workspace/model.txt; then echo ok > /outputs/health; fi; "
         "awk '{print \"{\\\"score\\\": \" $3 \"}\"}' /workspace/model.txt > /outputs/metrics.json")
# /cgi-bin/meta: the run id the replica serves (pipe sets PIPE_RUN_ID) and which container answered (its hostname),
# as the example's /metadata gives them
META_CGI = ('#!/bin/sh\necho Content-Type: application/json\necho\n'
            'echo "{\\"run_id\\": \\"$PIPE_RUN_ID\\", \\"host\\": \\"$(cat /etc/hostname)\\"}"\n')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver on loopback: keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [b["event"] for b in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


MakeServed = Callable[..., tuple[Path, int]]


@pytest.fixture
def make_served(docker: Any, make_pipeline: Callable[..., Path], receiver: Receiver) -> Iterator[MakeServed]:
    """A busybox model pipeline with a `serve:` block (`serve` entries update it, `top` adds top-level keys);
    everything it served is taken down and checked gone afterwards."""
    made: list[Path] = []

    def make(serve: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
             model: str = "v1 healthy 0.9\n", train: dict[str, Any] | None = None) -> tuple[Path, int]:
        port = free_port()
        path = make_pipeline({
            "name": "servetest",
            "stages": {
                "train": {"image": "pipe-busybox:latest", "command": TRAIN,
                          "inputs": ["model.txt", "meta.cgi"], "metrics": "metrics.json",
                          "gate": {"metric": "score", "min": 0.5}, **(train or {})},
            },
            "serve": {"model": "train", "image": "pipe-busybox:latest",
                      "command": ["httpd", "-f", "-p", "8080", "-h", "/model"], "port": 8080,
                      "publish": f"127.0.0.1:{port}", "resources": {"memory": "64m", "pids": 64},
                      "health": {"path": "/health", "interval": "200ms", "timeout": "1s", "healthy_after": 2,
                                 "start_timeout": "4s"}, **(serve or {})},
            "notify": [{"webhook": receiver.url, "timeout": "2s", "retries": 1}],
            **(top or {}),
        }, files={"model.txt": model, "meta.cgi": META_CGI})
        made.append(path)
        return path, port

    yield make
    for path in made:
        pipe("serve", "down", path)
        owner = str(path.parent / "runs")
        left = docker.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={owner}"})
        for c in left:
            c.remove(force=True)
        assert not left, f"serving containers left behind: {[c.name for c in left]}"


@pytest.fixture
def served(make_served: MakeServed) -> tuple[Path, int]:
    return make_served()


def get(port: int, path: str = "/metadata") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode().strip()


class Load:
    """Requests in a loop from a thread until stopped (bounded), counting failures and what answered."""

    def __init__(self, port: int, limit: int = 200_000) -> None:
        self.port, self.limit = port, limit
        self.failures: list[str] = []
        self.answers: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        for _ in range(self.limit):
            if self.stop.is_set():
                return
            try:
                self.answers.append(get(self.port))
            except (urllib.error.URLError, OSError) as e:
                self.failures.append(repr(e))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def retrain(path: Path, model: str) -> Any:
    (path.parent / "model.txt").write_text(model)
    return pipe("run", path)


def test_serve_swaps_under_load_and_keeps_the_old_model_when_the_new_one_is_unhealthy(
        served: tuple[Path, int], receiver: Receiver, docker: Any) -> None:
    path, port = served
    first = pipe("run", path)
    assert first.returncode == 0, first.stdout + first.stderr
    up = pipe("serve", "up", path, "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    assert json.loads(up.stdout)["up"] is True
    assert get(port) == "v1 healthy 0.9"

    load = Load(port)
    wait_for(lambda: len(load.answers) > 20, what="requests answered before the swap")
    second = retrain(path, "v2 healthy 0.95\n")  # auto-promotion at the end of the run swaps under load
    assert second.returncode == 0, second.stdout + second.stderr
    swapped_at = len(load.answers)  # the swap (old workers drained) finished before the run returned
    broken = retrain(path, "v3 broken 0.99\n")  # passes its gate, never answers /health
    assert broken.returncode == 0, broken.stdout + broken.stderr
    assert "did not become healthy" in broken.stdout + broken.stderr
    served_after_broken = get(port)
    gated = retrain(path, "v4 healthy 0.1\n")  # fails its gate: exit 1, never promoted
    assert gated.returncode == 1
    count = len(load.answers)
    wait_for(lambda: len(load.answers) > count + 20, what="requests after the failed promotion")
    load.finish()

    assert load.failures == []
    assert served_after_broken == "v2 healthy 0.95" and get(port) == "v2 healthy 0.95"
    assert load.answers[0] == "v1 healthy 0.9"
    assert set(load.answers[swapped_at:]) == {"v2 healthy 0.95"}  # once the swap returned, only the new model
    assert "promote_failed" in receiver.events() and "serve_unhealthy" in receiver.events()
    assert "gate_failed" in receiver.events() and receiver.events().count("promoted") == 2
    assert all("secret" not in json.dumps(b) for b in receiver.bodies)

    runs = json.loads(pipe("runs", path, "--json").stdout)
    gated_run = runs[0]["id"]
    refused = pipe("promote", gated_run, path)
    assert refused.returncode == 2 and "gate failed" in refused.stderr

    status = json.loads(pipe("serve", "status", path, "--history", "--json").stdout)
    events = [e["event"] for e in status["history"]]
    assert status["up"] is True and status["run_id"] == runs[2]["id"]
    assert events[:4] == ["promote_failed", "unhealthy", "promoted", "started"]
    assert sum(1 for r in status["replicas"] if r["routed"]) == 1

    load = Load(port)
    back = pipe("serve", "rollback", path, "--json")
    assert back.returncode == 0, back.stdout + back.stderr
    wait_for(lambda: load.answers and load.answers[-1] == "v1 healthy 0.9", what="answers after the rollback")
    load.finish()
    assert load.failures == []

    down = pipe("serve", "down", path)
    assert down.returncode == 0, down.stderr
    owner = str(path.parent / "runs")
    assert docker.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={owner}"}) == []
    assert docker.networks.list(names=[f"pipe-serve-{slug(owner)}"]) == []
    with pytest.raises((urllib.error.URLError, OSError)):
        get(port)


def test_serve_recovers_after_sigkill_of_a_promoting_pipe(served: tuple[Path, int], docker: Any) -> None:
    path, port = served
    assert pipe("run", path).returncode == 0
    assert pipe("serve", "up", path).returncode == 0
    (path.parent / "model.txt").write_text("v2 healthy 0.95\n")
    done = pipe("run", path, "-p", "+train.x=1")  # the hook swaps; a second run id to promote back and forth
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(pipe("runs", path, "--json").stdout)
    owner = str(path.parent / "runs")

    def replicas() -> list[Any]:
        return [c for c in docker.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={owner}"})
                if c.labels.get(LABEL_SERVE_ROLE) == "replica"]

    promoting = start_pipe("promote", runs[1]["id"], path)
    wait_for(lambda: len(replicas()) == 2, what="the new replica beside the old one")
    promoting.send_signal(signal.SIGKILL)
    promoting.wait(timeout=30)

    assert get(port) == "v2 healthy 0.95"  # the proxy was not switched: the old model serves
    status = json.loads(pipe("serve", "status", path, "--json").stdout)
    assert status["up"] is True and len(status["replicas"]) == 2
    again = pipe("serve", "up", path, "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(replicas()) == 1 and get(port) == "v2 healthy 0.95"
    assert pipe("serve", "down", path).returncode == 0
    assert docker.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={owner}"}) == []


def test_a_crashed_replica_is_restarted_recorded_and_notified(served: tuple[Path, int], receiver: Receiver,
                                                              docker: Any) -> None:
    path, port = served
    assert pipe("run", path).returncode == 0
    assert pipe("serve", "up", path).returncode == 0
    owner = str(path.parent / "runs")
    (replica,) = [c for c in docker.containers.list(filters={"label": f"{LABEL_SERVE_OWNER}={owner}"})
                  if c.labels.get(LABEL_SERVE_ROLE) == "replica"]
    replica.exec_run(["sh", "-c", "kill -9 $(pidof httpd)"])  # the model's process dies; the engine restarts it

    def restarted() -> bool:
        replica.reload()
        return int(replica.attrs["RestartCount"]) >= 1 and replica.status == "running"

    wait_for(restarted, what="the engine's restart of the crashed replica")
    check = pipe("serve", "check", path, "--json")
    wait_for(lambda: get(port) == "v1 healthy 0.9", what="the restarted replica answering")
    history = json.loads(pipe("serve", "status", path, "--history", "--json").stdout)["history"]
    assert history[0]["event"] == "restarted" and history[0]["ok"] is False, check.stdout + check.stderr
    assert "serve_unhealthy" in receiver.events()
    again = pipe("serve", "check", path)  # the same restart is recorded once
    assert again.returncode == 0
    assert [e["event"] for e in json.loads(pipe("serve", "status", path, "--history", "--json").stdout)["history"]
            ].count("restarted") == 1


def meta(port: int) -> dict[str, str]:
    answer: dict[str, str] = json.loads(get(port, "/cgi-bin/meta"))
    return answer


def replica_containers(docker: Any, path: Path) -> list[Any]:
    owner = str(path.parent / "runs")
    return [c for c in docker.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={owner}"})
            if c.labels.get(LABEL_SERVE_ROLE) == "replica"]


def hosts_answering(port: int, want: int, tries: int = 200) -> set[str]:
    seen: set[str] = set()
    for _ in range(tries):
        seen.add(meta(port)["host"])
        if len(seen) >= want:
            break
    return seen


def test_two_replicas_are_both_routed_and_a_swap_replaces_both_under_load(
        make_served: MakeServed, docker: Any) -> None:
    path, port = make_served({"replicas": 2})
    first = pipe("run", path)
    assert first.returncode == 0, first.stdout + first.stderr
    up = pipe("serve", "up", path, "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    old = replica_containers(docker, path)
    assert len(old) == 2 and all(c.status == "running" for c in old)
    routing = serve_proxy.read(path.parent / "runs" / "serve" / "proxy")
    conf = (path.parent / "runs" / "serve" / "proxy" / "nginx.conf").read_text()
    assert {cid for cid, _ in routing.replicas} == {c.id for c in old}
    assert sum(line.strip().startswith("server ") and line.strip() != "server {" for line in conf.splitlines()) == 2
    for c in old:
        c.reload()
        ip = next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
        assert f"server {ip}:8080 " in conf
    assert hosts_answering(port, 2) == {c.id[:12] for c in old}  # requests reach both
    status = json.loads(pipe("serve", "status", path, "--json").stdout)
    assert [r["routed"] and r["healthy"] for r in status["replicas"]] == [True, True]

    load = Load(port)
    wait_for(lambda: len(load.answers) > 20, what="requests answered before the swap")
    second = retrain(path, "v2 healthy 0.95\n")  # auto-promotion: two new replicas, both healthy, then the switch
    assert second.returncode == 0, second.stdout + second.stderr
    swapped_at = len(load.answers)
    wait_for(lambda: len(load.answers) > swapped_at + 20, what="requests after the swap")
    load.finish()
    assert load.failures == []
    assert set(load.answers[swapped_at:]) == {"v2 healthy 0.95"}
    new = replica_containers(docker, path)
    assert len(new) == 2 and not {c.id for c in new} & {c.id for c in old}  # both old ones replaced
    assert hosts_answering(port, 2) == {c.id[:12] for c in new}
    runs = json.loads(pipe("runs", path, "--json").stdout)
    assert {meta(port)["run_id"] for _ in range(4)} == {runs[0]["id"]}

    rerun = pipe("run", path)  # nothing changed: the model it restores is the one served, nothing is swapped
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {c.id for c in replica_containers(docker, path)} == {c.id for c in new}
    history = json.loads(pipe("serve", "status", path, "--history", "--json").stdout)
    assert history["run_id"] == runs[0]["id"] and history["history"][0]["event"] == "promoted"
    assert json.loads(pipe("runs", path, "--json").stdout)[0]["id"] != runs[0]["id"]  # a new run all the same


def test_a_scheduled_run_that_passes_its_gate_is_promoted_and_metadata_changes(make_served: MakeServed) -> None:
    path, port = make_served({"promote": "auto"},
                             top={"schedule": {"cron": "* * * * *", "timezone": "UTC", "overlap": "skip"}})
    assert pipe("run", path).returncode == 0
    assert pipe("serve", "up", path).returncode == 0
    manual = json.loads(pipe("runs", path, "--json").stdout)[0]["id"]
    assert meta(port)["run_id"] == manual
    (path.parent / "model.txt").write_text("v2 healthy 0.95\n")  # better data: the scheduled retrain differs

    stop = threading.Event()
    scheduled: list[Any] = []

    def a_scheduled_run_finished() -> bool:
        scheduled[:] = [r for r in api.list_runs(api.Target(path), status=None, trigger="schedule", limit=10)
                        if r.status != "running"]
        return bool(scheduled)

    thread = threading.Thread(target=api.run_scheduler, args=([path], api.Target(path), NullReporter(), stop),
                              kwargs={"clock": FastClock(), "wait": lambda s: stop.wait(0.05)})
    thread.start()
    try:
        wait_for(a_scheduled_run_finished, timeout=120, what="a scheduled run")
    finally:
        stop.set()
        thread.join(timeout=120)  # the scheduler finishes its run, promotion included, before it stops
    assert not thread.is_alive()
    run = scheduled[-1]  # the first one it fired
    assert run.status == "succeeded" and run.trigger == "schedule"
    served = meta(port)["run_id"]
    fired = {r.id for r in api.list_runs(api.Target(path), status=None, trigger="schedule", limit=10)}
    assert served != manual and served in fired
    assert get(port) == "v2 healthy 0.95"
    history = json.loads(pipe("serve", "status", path, "--history", "--json").stdout)["history"]
    promoted = [e for e in history if e["event"] == "promoted" and e["run_id"] == run.id]
    assert promoted and promoted[-1]["detail"].startswith(f"auto: run {run.id} passed its gate")


def test_gc_keeps_the_served_run_and_the_rollback_target_and_says_why(make_served: MakeServed) -> None:
    path, port = make_served({"promote": "manual"})
    ids = []
    for model in ("v1 healthy 0.9\n", "v2 healthy 0.91\n", "v3 healthy 0.92\n", "v4 healthy 0.93\n"):
        assert retrain(path, model).returncode == 0
        ids.append(json.loads(pipe("runs", path, "--json").stdout)[0]["id"])
        if len(ids) == 1:
            assert pipe("serve", "up", path).returncode == 0
        if len(ids) == 2:
            assert pipe("promote", ids[1], path).returncode == 0  # served: run 2; rollback goes to run 1
    dry = pipe("gc", path, "--keep-runs", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"kept run {ids[1]}, which the keep rules would remove: it is the served model" in dry.stdout
    assert f"kept run {ids[0]}, which the keep rules would remove: `pipe serve rollback` goes back to it" in dry.stdout
    done = pipe("gc", path, "--keep-runs", "1", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["runs_removed"] == [ids[2]]  # run 4 is the newest; runs 1 and 2 are held by serving
    assert {h["run_id"]: h["reason"] for h in report["runs_held"]} == {
        ids[1]: "it is the served model", ids[0]: "`pipe serve rollback` goes back to it"}
    assert (path.parent / "runs" / ids[0]).is_dir() and (path.parent / "runs" / ids[1]).is_dir()
    assert not (path.parent / "runs" / ids[2]).exists()
    back = pipe("serve", "rollback", path)  # the held folder is what rollback mounts
    assert back.returncode == 0, back.stdout + back.stderr
    assert get(port) == "v1 healthy 0.9" and meta(port)["run_id"] == ids[0]


def test_restarts_are_bounded_then_the_replica_stays_down_and_check_says_so(
        make_served: MakeServed, receiver: Receiver, docker: Any) -> None:
    path, port = make_served({"restarts": 1})
    assert pipe("run", path).returncode == 0
    assert pipe("serve", "up", path).returncode == 0
    (replica,) = replica_containers(docker, path)

    def crash() -> None:
        replica.reload()
        if replica.status == "running":
            replica.exec_run(["sh", "-c", "kill -9 $(pidof httpd)"])

    def state() -> tuple[str, int]:
        replica.reload()
        return replica.status, int(replica.attrs["RestartCount"])

    crash()
    wait_for(lambda: state() == ("running", 1), what="the engine's one allowed restart")
    crash()  # a second crash with restarts: 1 is not restarted
    wait_for(lambda: state()[0] == "exited", what="the replica to stay down")
    time.sleep(1)
    assert state() == ("exited", 1)
    check = pipe("serve", "check", path, "--json")
    assert json.loads(check.stdout)["up"] is False, check.stdout + check.stderr
    history = [e["event"] for e in json.loads(pipe("serve", "status", path, "--history", "--json").stdout)["history"]]
    assert history[:2] == ["unhealthy", "restarted"] or history[:2] == ["restarted", "unhealthy"], history
    assert "serve_unhealthy" in receiver.events()
    with pytest.raises((urllib.error.URLError, OSError)):  # nginx answers 502: nothing behind it
        get(port)


def test_a_secret_the_replica_prints_stays_out_of_errors_history_and_payloads(
        make_served: MakeServed, receiver: Receiver) -> None:
    token = "tok-7f3a9c-not-for-payloads"
    path, _ = make_served({"command": ["sh", "-c", "cat /model/token; echo; exec httpd -f -p 8080 -h /model"]},
                          model="v1 broken 0.9\n",  # passes its gate, never answers /health
                          train={"secrets": ["API_TOKEN"], "command": TRAIN + "; cat /run/secrets/API_TOKEN > /outputs/token"})
    env = {"API_TOKEN": token}
    assert pipe("run", path, env=env).returncode == 0
    up = pipe("serve", "up", path, env=env)
    assert up.returncode == 1 and "did not become healthy" in up.stderr
    assert "last output: ***" in up.stderr and token not in up.stdout + up.stderr
    history = pipe("serve", "status", path, "--history", "--json", env=env).stdout
    assert "last output: ***" in history and token not in history
    assert "serve_unhealthy" in receiver.events() and token not in json.dumps(receiver.bodies)
