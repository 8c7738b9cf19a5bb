"""The web UI's server without a browser: read-only methods, the token, the Host check, safe downloads and the
same JSON as the CLI's --json. The browser suite is tests/browser."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import api, webui
from orchestrator.errors import UsageError
from tests.e2e.helpers import pipe
from tests.history import Made, make_history
from tests.ui_server import request, serve


@pytest.fixture
def made(make_pipeline: Callable[..., Path]) -> Made:
    return make_history(make_pipeline)


@pytest.fixture
def server(made: Made) -> Iterator[webui.UIServer]:
    with serve(made.path) as running:
        yield running


def concrete(pattern: str, made: Made) -> str:
    """A real URL for each route pattern."""
    return (pattern.replace("/runs/([^/]+)/logs/([^/]+)", f"/runs/{made.broken}/logs/train")
            .replace("/runs/([^/]+)/artifacts/([^/]+)/(.+)", f"/runs/{made.better}/artifacts/train/model.bin")
            .replace("([^/]+)", made.broken))


def test_every_route_answers_get_and_head_and_refuses_every_writing_method(server: webui.UIServer,
                                                                           made: Made) -> None:
    paths = [concrete(p.pattern.strip("^$"), made) for p, _ in webui.ROUTES]
    assert len(paths) == len(webui.ROUTES) >= 14
    for path in paths:
        if path == "/api/schedule":  # this pipeline has no schedule: a 400 that says so
            assert request(server, path).status == 400
            continue
        got = request(server, path)
        assert got.status == 200, (path, got.text)
        head = request(server, path, "HEAD")
        assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(len(got.body))
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            refused = request(server, path, method)
            assert refused.status == 405, (method, path)
            assert refused.headers["allow"] == "GET, HEAD"
    assert request(server, "/nothing/here").status == 404


def test_the_json_is_the_clis(server: webui.UIServer, made: Made) -> None:
    def cli(*args: str) -> object:
        done = pipe(*args, "--json", cwd=made.path.parent)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def ui(path: str) -> object:
        return json.loads(request(server, path).body)

    assert ui(f"/api/runs/{made.better}") == cli("show", made.better, str(made.path))
    assert ui("/api/runs?limit=3") == cli("runs", str(made.path), "--limit", "3")
    assert ui(f"/api/compare?a={made.first}&b={made.better}") == cli("compare", made.first, made.better,
                                                                      str(made.path))
    assert ui("/api/metrics") == cli("metrics", str(made.path))
    assert ui("/api/plot") == cli("plot", "-f", str(made.path))


def test_off_loopback_a_token_is_generated_and_every_request_without_it_refused(made: Made) -> None:
    with serve(made.path, host="0.0.0.0") as server:
        assert server.generated_token and server.token and len(server.token) >= 24
        for path in ("/", f"/runs/{made.broken}", "/api/runs", f"/runs/{made.better}/artifacts/train/model.bin",
                     "/static/app.js"):
            refused = request(server, path)
            assert refused.status == 401 and "token" in refused.text
            assert request(server, path + "?token=wrong-token").status == 401
            assert request(server, path, headers={"Cookie": "pipe_ui_token=nope"}).status == 401
        first = request(server, f"/?token={server.token}")
        assert first.status == 200 and "HttpOnly" in first.headers["set-cookie"]
        cookie = first.headers["set-cookie"].split(";")[0]
        assert request(server, "/api/runs", headers={"Cookie": cookie}).status == 200
        assert request(server, "/api/runs", headers={"Authorization": f"Bearer {server.token}"}).status == 200


def test_a_given_token_is_enforced_on_loopback_too(made: Made) -> None:
    with serve(made.path, token="s3cret-token-1") as server:
        assert not server.generated_token
        assert request(server, "/api/runs").status == 401
        assert request(server, "/api/runs?token=s3cret-token-1").status == 200
    with pytest.raises(UsageError, match="at least 8"):
        webui.make_server(api.Target(made.path), "127.0.0.1", 0, "short")


def test_loopback_without_a_token_refuses_another_host_name(server: webui.UIServer) -> None:
    assert request(server, "/api/runs", headers={"Host": "evil.example:8000"}).status == 403
    assert request(server, "/api/runs", headers={"Host": f"localhost:{server.server_address[1]}"}).status == 200


def test_artifact_downloads_stay_inside_the_state_folder(server: webui.UIServer, made: Made) -> None:
    good = request(server, f"/runs/{made.better}/artifacts/train/model.bin")
    assert good.status == 200 and good.body.startswith(b"model ")
    assert "attachment" in good.headers["content-disposition"]
    outputs = made.path.parent / "runs" / made.better / "train"
    secret = made.path.parent / "secret.txt"
    secret.write_text("not yours\n")
    # a recorded artifact later replaced by a symlink to a file outside
    (outputs / "model.bin").chmod(0o644)
    os.unlink(outputs / "model.bin")
    os.symlink(secret, outputs / "model.bin")
    for path in (
        f"/runs/{made.better}/artifacts/train/model.bin",  # now a symlink out
        f"/runs/{made.better}/artifacts/train/../../../secret.txt",
        f"/runs/{made.better}/artifacts/train/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        f"/runs/{made.better}/artifacts/train/..%2f..%2f..%2fsecret.txt",
        f"/runs/{made.better}/artifacts/train/%252e%252e/secret.txt",
        f"/runs/{made.better}/artifacts/train//etc/passwd",
        f"/runs/{made.better}/artifacts/train/%2Fetc%2Fpasswd",
        f"/runs/{made.better}/artifacts/nostage/model.bin",
        f"/runs/{made.better}/artifacts/..%2f..%2f/model.bin",
    ):
        refused = request(server, path)
        assert refused.status == 404, path
        assert b"not yours" not in refused.body and b"root:" not in refused.body


def test_an_artifact_left_in_the_remote_says_how_to_bring_it(server: webui.UIServer, made: Made) -> None:
    from orchestrator.runner import remove_outputs

    remove_outputs(made.path.parent / "runs" / made.better / "train")  # as a swarm run with --fetch none leaves it
    missing = request(server, f"/runs/{made.better}/artifacts/train/model.bin")
    assert missing.status == 404
    assert f"`pipe pull {made.better} --stage train` brings them".encode() in missing.body


def test_logs_from_an_offset_and_whether_to_follow(server: webui.UIServer, made: Made) -> None:
    whole = request(server, f"/runs/{made.broken}/logs/train")
    assert whole.status == 200 and whole.text == "train exit 1\n"
    assert whole.headers["x-stage-running"] == "0" and whole.headers["x-log-offset"] == str(len(whole.body))
    rest = request(server, f"/runs/{made.broken}/logs/train?offset=6")
    assert rest.text == "exit 1\n"
    cached = request(server, f"/runs/{made.repeat}/logs/train")  # a cached stage: its origin's log
    assert cached.status == 200 and cached.text == "train exit 0\n"
    assert request(server, f"/runs/{made.broken}/logs/nope").status == 404


def test_ui_writes_nothing(made: Made) -> None:
    state = made.path.parent / "runs"
    before = {str(p): p.stat().st_mtime_ns for p in state.rglob("*")}
    with serve(made.path) as server:
        for path in ("/", f"/runs/{made.broken}", "/metrics", "/compare", "/schedules", "/api/runs"):
            assert request(server, path).status == 200
    assert {str(p): p.stat().st_mtime_ns for p in state.rglob("*")} == before


def test_cli_prints_the_url_and_the_generated_token(made: Made) -> None:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", str(made.path), "--port", "0",
                                "--host", "0.0.0.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url, token = process.stdout.readline(), process.stdout.readline()
        assert url.startswith("pipe ui: http://0.0.0.0:") and token.startswith("token (required on every request): ")
    finally:
        process.terminate()
        process.wait(30)
