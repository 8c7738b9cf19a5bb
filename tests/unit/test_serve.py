"""Serving without an engine: the serve:/notify: blocks (loader and schema agree), schema v5 and a v4 database
upgraded to it, notifications against a receiver on loopback, the proxy's configuration, rollback's choice."""

from __future__ import annotations

import json
import sqlite3
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from orchestrator import notify, serve_proxy
from orchestrator.loader import load_pipeline
from orchestrator.serving import current_run, held_runs, previous_run
from orchestrator.spec import Notify
from orchestrator.store import migrations
from orchestrator.store.records import ServeEventInfo
from orchestrator.store.store import Store
from tests.unit.test_loader import assert_schema_agrees, error_of

MakePipeline = Callable[..., Path]
STAGES = "stages:\n  train: {image: busybox, command: [\"true\"]}\n"


def test_serve_and_notify_blocks_load(make_pipeline: MakePipeline) -> None:
    path = make_pipeline(STAGES + textwrap.dedent("""\
        serve:
          model: train
          image: my-server:1
          publish: 127.0.0.1:9000
          health: {path: /ping, interval: 2s, timeout: 1s, healthy_after: 2}
          replicas: 2
          resources: {cpus: 1, memory: 1g}
          promote: manual
        notify:
          - webhook: http://127.0.0.1:9/hook
            events: [failed, promoted]
          - command: "cat >> notes.jsonl"
        """))
    pipeline = load_pipeline(path)
    assert_schema_agrees(path)
    serve = pipeline.serve
    assert serve is not None and serve.publish_host == "127.0.0.1" and serve.publish_port == 9000
    assert (serve.health.path, serve.health.interval, serve.health.healthy_after) == ("/ping", 2.0, 2)
    assert serve.promote == "manual" and serve.resources.memory == 1024**3
    assert pipeline.notify[0].events == ("failed", "promoted") and pipeline.notify[1].command == "cat >> notes.jsonl"


@pytest.mark.parametrize(("block", "expected"), [
    ("serve:\n  model: train\n  image: x\n  promote: sometimes\n",
     "6: serve.promote: expected 'auto' or 'manual', got the string 'sometimes'"),
    ("serve:\n  model: train\n  image: x\n  publish: 8080\n", "6: serve.publish: expected a string, got 8080"),
    ("serve:\n  model: train\n  image: x\n  replica: 2\n", "6: serve.replica: unknown key (did you mean 'replicas'?)"),
    ("serve:\n  model: train\n", "3: serve: needs 'image' (an existing image) or 'build'"),
    ("notify:\n  - events: [failed]\n", "4: notify.0: needs 'webhook'"),
    ("notify:\n  - webhook: http://h/x\n    events: [exploded]\n", "5: notify.0.events.0: expected 'failed', 'gate_failed'"),
])
def test_bad_serve_and_notify_blocks_name_their_line(make_pipeline: MakePipeline, block: str, expected: str) -> None:
    assert error_of(make_pipeline, STAGES + block).startswith(expected)


def test_serve_model_must_name_a_stage(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, STAGES + "serve:\n  model: trian\n  image: x\n")  # the schema accepts it
    assert message == "4: serve.model: unknown stage 'trian' (did you mean 'train'?)"


# -- schema v5 --------------------------------------------------------------------------------------------------


def test_v4_database_upgrades_to_the_current_schema_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "pipe.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # a database exactly as a v4 pipe left it, with one run
        migrations.upgrade(conn, 0, 4)
        conn.execute(text("INSERT INTO run (id, pipeline, pipeline_path, pipeline_hash, trigger, status, started_at,"
                          " host, pid, params_override) VALUES ('20261101-030000-1a2b', 'iris', '/p', 'h', 'manual',"
                          " 'succeeded', '2026-11-01 03:00:00', 'h1', 1, '{}')"))
    engine.dispose()
    with Store(f"sqlite:///{path}") as store:
        assert store.get_run("latest", "iris").id == "20261101-030000-1a2b"
        store.record_serve_event("iris", "promoted", "20261101-030000-1a2b", "d1", detail="pipe promote")
        store.record_serve_event("iris", "promoted", "no-such-run", "d2")  # kept, its run id as None
        events = store.serve_events("iris")
    assert [(e.event, e.run_id, e.digest) for e in events] == [("promoted", None, "d2"),
                                                               ("promoted", "20261101-030000-1a2b", "d1")]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(migrations.SCHEMA_VERSION,)]


def _event(event: str, run_id: str, ok: bool = True) -> ServeEventInfo:
    return ServeEventInfo("p", datetime(2026, 12, 1, tzinfo=UTC), event, run_id, "d", ok, "")


def test_rollback_goes_to_the_run_served_before_the_current_one() -> None:
    events = [_event("promote_failed", "r4", ok=False), _event("promoted", "r3"), _event("stopped", "r3"),
              _event("started", "r2"), _event("promoted", "r2"), _event("promoted", "r1")]  # newest first
    assert current_run(events) == "r3"
    assert previous_run(events) == "r2"
    assert previous_run([_event("started", "r1")]) is None


def test_gc_holds_the_served_run_the_rollback_target_and_what_the_proxy_routes_to() -> None:
    events = [_event("promote_failed", "r4", ok=False), _event("promoted", "r3"), _event("started", "r2")]
    assert held_runs(events, serve_proxy.Routing("r3", "d", (("c", "a:1"),))) == {
        "r3": "it is the served model", "r2": "`pipe serve rollback` goes back to it"}
    killed = held_runs(events, serve_proxy.Routing("r1", "d", (("c", "a:1"),)))  # a swap whose pipe was killed
    assert killed["r1"] == "the serving proxy routes to it" and set(killed) == {"r1", "r2", "r3"}
    assert held_runs([], serve_proxy.EMPTY) == {}


# -- the proxy's configuration ------------------------------------------------------------------------------------


def test_proxy_config_records_its_routing_and_an_empty_one_answers_503(tmp_path: Path) -> None:
    routing = serve_proxy.Routing("r1", "d1", (("c1", "172.18.0.2:8080"), ("c2", "172.18.0.3:8080")))
    serve_proxy.write(tmp_path, routing)
    conf = (tmp_path / serve_proxy.CONF_NAME).read_text()
    assert "server 172.18.0.2:8080" in conf and "server 172.18.0.3:8080" in conf
    assert serve_proxy.read(tmp_path) == routing
    assert "return 503" in serve_proxy.render(serve_proxy.EMPTY)
    assert serve_proxy.parse("worker_processes 1;\n") == serve_proxy.EMPTY
    front = (tmp_path / serve_proxy.FRONT_NAME).read_text()  # holds the clients; never reloaded
    assert f"listen {serve_proxy.PROXY_PORT};" in front and f"listen {serve_proxy.PROXY_PORT};" not in conf
    assert f"proxy_pass http://unix:{serve_proxy.BACK_SOCKET}:;" in front and "keepalive" not in front
    assert f"listen unix:{serve_proxy.BACK_SOCKET};" in conf and serve_proxy.parse(front) == serve_proxy.EMPTY


# -- notifications ------------------------------------------------------------------------------------------------


class Receiver:
    def __init__(self, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.tries = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.tries += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay_s)
                if outer.tries <= fail_first:
                    self.send_response(500)
                else:
                    outer.bodies.append(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(**getattr(request, "param", {}))
    yield r
    r.server.shutdown()


@pytest.mark.parametrize("receiver", [{"fail_first": 1}], indirect=True)
def test_webhook_gets_one_json_post_per_event_with_a_retry(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "BACKOFF_S", 0.01)
    target = Notify(webhook=receiver.url, events=("promoted",), retries=2)
    assert notify.send([target], notify.payload("promoted", "iris", "r1", "d1", "token=hunter2"), ["hunter2"]) == []
    assert notify.send([target], notify.payload("failed", "iris", "r1")) == []  # not subscribed: nothing sent
    assert receiver.tries == 2 and len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert (body["event"], body["pipeline"], body["run_id"], body["digest"]) == ("promoted", "iris", "r1", "d1")
    assert "hunter2" not in json.dumps(body)


@pytest.mark.parametrize("receiver", [{"delay_s": 1.0}], indirect=True)
def test_a_slow_or_absent_receiver_is_given_up_with_one_line(receiver: Receiver, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setattr(notify, "BACKOFF_S", 0.01)
    slow = Notify(webhook=receiver.url, timeout=0.2, retries=1)
    problems = notify.send([slow], notify.payload("failed", "iris"))
    assert len(problems) == 1 and "after 2 tries" in problems[0]
    down = Notify(webhook="http://127.0.0.1:9/none", retries=0)  # port 9 (discard) refuses on loopback
    assert len(notify.send([down], notify.payload("failed", "iris"))) == 1


def test_command_target_reads_the_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    target = Notify(command=f"cat > {out}")
    assert notify.send([target], notify.payload("serve_unhealthy", "iris", "r2")) == []
    assert json.loads(out.read_text())["event"] == "serve_unhealthy"
    failing = Notify(command=["false"], retries=0)
    assert notify.send([failing], notify.payload("failed", "iris")) == ["notify false: exited with code 1 (after 1 tries)"]
