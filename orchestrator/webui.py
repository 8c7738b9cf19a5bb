"""`pipe ui`: a read-only web server over the history and state the CLI uses.

The standard library's ThreadingHTTPServer, not a framework: the UI is a handful of GET routes for one user on
loopback, answered from SQLite in milliseconds; Starlette/FastAPI with uvicorn would add two dependencies and an
event loop for nothing a thread per request does not do, and this keeps `pipe` installable without them.

Read-only by construction: only GET and HEAD are routed (every other method answers 405), the history is opened
with `read_store` (which never creates, migrates or writes), and the only files served are artifacts a run
recorded, resolved inside the state folder. Loopback by default; on any other address a token is required (one
is generated and printed when none is given), and every request without it is refused: the token comes as
`?token=` once (then a cookie), or `Authorization: Bearer`. Without a token, a request naming another Host is
refused too, so a web page cannot read the UI through DNS rebinding. The JSON is the CLI's `--json`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import secrets
import socket
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from orchestrator import api, console, explore, webpages
from orchestrator.errors import NotFound, PipeError, UsageError

COOKIE = "pipe_ui_token"
METHODS = ("GET", "HEAD")
CSP = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class UIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: api.Target, host: str, port: int, token: str | None, generated: bool) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.target, self.token, self.generated_token = target, token, generated
        self.loopback = is_loopback(host)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.server_address[1]}/"
        self.charts: dict[tuple[Any, ...], str] = {}  # drawn SVGs by (metric, runs recorded): matplotlib is slow


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(target: api.Target, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> UIServer:
    """Bind (port 0: any free one); loads the pipeline first so that a bad file fails here, not per request."""
    api.load(target)
    generated = False
    if token is not None and len(token) < 8:
        raise UsageError("--token must be at least 8 characters")
    if token is None and not is_loopback(host):
        token, generated = secrets.token_urlsafe(24), True
    try:
        return UIServer(target, host, port, token, generated)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


Route = Callable[["Handler", re.Match[str], dict[str, str]], None]
ROUTES: list[tuple[re.Pattern[str], str]] = []  # (path pattern, handler method name): every one is GET/HEAD


def route(pattern: str) -> Callable[[Route], Route]:
    def register(fn: Route) -> Route:
        ROUTES.append((re.compile(f"^{pattern}$"), fn.__name__))
        return fn

    return register


class Handler(BaseHTTPRequestHandler):
    server: UIServer
    server_version = "pipe-ui"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the terminal shows the URL and errors only

    # ---- methods: GET and HEAD only --------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _refuse_method(self) -> None:
        self._plain(HTTPStatus.METHOD_NOT_ALLOWED, "pipe ui is read-only: GET and HEAD only\n", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    # ---- auth, routing, answers ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        set_cookie = self._authorize(query)
        if set_cookie is None:
            return
        self._cookie = set_cookie
        for pattern, name in ROUTES:
            if match := pattern.match(url.path):
                try:
                    getattr(self, name)(match, query)
                except NotFound as e:
                    self._plain(HTTPStatus.NOT_FOUND, f"{e}\n")
                except UsageError as e:
                    self._plain(HTTPStatus.BAD_REQUEST, f"{e}\n")
                except PipeError as e:
                    self._plain(HTTPStatus.INTERNAL_SERVER_ERROR, f"{e}\n")
                return
        self._plain(HTTPStatus.NOT_FOUND, f"no page {url.path}\n")

    def _authorize(self, query: dict[str, str]) -> bool | None:
        """True: pass, set the cookie; False: pass; None: refused (answered)."""
        token = self.server.token
        if token is None:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if self.server.loopback and host not in ("localhost", "127.0.0.1", "::1"):
                self._plain(HTTPStatus.FORBIDDEN, "pipe ui answers only to localhost on loopback\n")
                return None
            return False
        given = query.get("token")
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            return True
        bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        cookies = dict(part.strip().split("=", 1) for part in (self.headers.get("Cookie") or "").split(";")
                       if "=" in part)
        for candidate in (bearer, cookies.get(COOKIE, "")):
            if candidate and hmac.compare_digest(candidate.encode(), token.encode()):
                return False
        self._plain(HTTPStatus.UNAUTHORIZED, "pipe ui needs its token: open the URL with ?token=... as printed\n",
                    {"WWW-Authenticate": "Bearer"})
        return None

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        if getattr(self, "_cookie", False) and self.server.token:
            self.send_header("Set-Cookie", f"{COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _plain(self, status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8", headers)

    def _html(self, text: str) -> None:
        self._send(HTTPStatus.OK, text.encode(), "text/html; charset=utf-8")

    def _json(self, value: Any) -> None:
        body = json.dumps(value, indent=2, sort_keys=True, default=str).encode()
        self._send(HTTPStatus.OK, body, "application/json")

    @property
    def _target(self) -> api.Target:
        return self.server.target

    # ---- pages -----------------------------------------------------------------------------------------------

    @route("/")
    def page_runs(self, match: re.Match[str], query: dict[str, str]) -> None:
        with explore.history(self._target) as h:
            self._html(webpages.runs_page(h.name))

    @route("/runs/([^/]+)")
    def page_run(self, match: re.Match[str], query: dict[str, str]) -> None:
        with explore.history(self._target) as h:
            page = explore.run_page(h, unquote(match.group(1)))
        self._html(webpages.run_page(page))

    @route("/metrics")
    def page_metrics(self, match: re.Match[str], query: dict[str, str]) -> None:
        table = explore.metrics_table(self._target, limit=_int(query.get("limit"), 50))
        with explore.history(self._target) as h:
            data = explore.plot_data(h)
            charts = [(s.name, self._chart(data, s, h.store.count_runs(h.name))) for s in data.series]
        self._html(webpages.metrics_page(h.name, table, charts))

    def _chart(self, data: Any, series: Any, runs: int) -> str:
        from dataclasses import replace

        key = (series.name, runs, len(series.points), data.promoted, tuple(series.gates))
        if key not in self.server.charts:
            svg, note = explore.chart_svg(replace(data, series=[series]))
            self.server.charts[key] = svg or f'<p class="muted">{webpages.esc(note)}</p>'
        return self.server.charts[key]

    @route("/compare")
    def page_compare(self, match: re.Match[str], query: dict[str, str]) -> None:
        a, b = query.get("a") or "latest~1", query.get("b") or "latest"
        with explore.history(self._target) as h:
            runs = h.store.runs_window(h.name, limit=200, with_stages=False)
            try:
                comparison = explore.compare(explore.resolve_run(h, a), explore.resolve_run(h, b))
                problem = ""
            except NotFound as e:
                comparison, problem = None, str(e)
        self._html(webpages.compare_page(h.name, runs, a, b, comparison, problem))

    @route("/schedules")
    def page_schedules(self, match: re.Match[str], query: dict[str, str]) -> None:
        try:
            report: Any = api.schedule_report(self._target, 10)
            problem = ""
        except UsageError as e:
            report, problem = None, str(e)
        self._html(webpages.schedules_page(api.load(self._target).pipeline.display_name, report, problem))

    @route("/static/app.js")
    def static_js(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._send(HTTPStatus.OK, webpages.APP_JS.encode(), "text/javascript; charset=utf-8")

    # ---- data: the CLI's --json ------------------------------------------------------------------------------

    @route("/api/runs")
    def api_runs(self, match: re.Match[str], query: dict[str, str]) -> None:
        found = api.list_runs(self._target, query.get("status") or None, query.get("trigger") or None,
                              _int(query.get("limit"), 100))
        self._json([r.to_json() for r in found])

    @route("/api/runs/([^/]+)")
    def api_run(self, match: re.Match[str], query: dict[str, str]) -> None:
        with explore.history(self._target) as h:
            info = explore.resolve_run(h, unquote(match.group(1)))
        pruned = api.pruned_at(self._target, info.id)
        self._json({**info.to_json(), "outputs_pruned_at": console.pruned_json(pruned)})

    @route("/api/metrics")
    def api_metrics(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._json(explore.metrics_table(self._target, limit=_int(query.get("limit"), 20),
                                         all_runs=query.get("all") == "1").to_json())

    @route("/api/plot")
    def api_plot(self, match: re.Match[str], query: dict[str, str]) -> None:
        names = [n for n in (query.get("metric") or "").split(",") if n]
        self._json({**explore.plot_series(self._target, names).to_json(), "output": None})

    @route("/api/compare")
    def api_compare(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._json(explore.compare_runs(self._target, query.get("a") or "latest~1", query.get("b") or "latest")
                   .to_json())

    @route("/api/schedule")
    def api_schedule(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._json(console.schedule_json(api.schedule_report(self._target, _int(query.get("count"), 5))))

    # ---- files -----------------------------------------------------------------------------------------------

    @route("/runs/([^/]+)/logs/([^/]+)")
    def log(self, match: re.Match[str], query: dict[str, str]) -> None:
        """A stage's log from byte `offset` on; X-Stage-Running says whether to ask again (live follow)."""
        run, stage = unquote(match.group(1)), unquote(match.group(2))
        log = api.log_path(self._target, run, stage, origin=True)
        offset = _int(query.get("offset"), 0)
        try:
            with open(log.path, "rb") as f:
                f.seek(offset)
                body = f.read(4 << 20)
        except FileNotFoundError:
            body = b""
        running = api.stage_running(self._target, log.origin or log.run.id, stage)
        self._send(HTTPStatus.OK, body, "text/plain; charset=utf-8",
                   {"X-Stage-Running": "1" if running else "0", "X-Log-Offset": str(offset + len(body))})

    @route("/runs/([^/]+)/artifacts/([^/]+)/(.+)")
    def artifact(self, match: re.Match[str], query: dict[str, str]) -> None:
        run, stage, rel = (unquote(part) for part in match.groups())
        with explore.history(self._target) as h:
            opened = explore.open_artifact(h, run, stage, rel)
        with opened as f:
            body = f.read()
        name = rel.rsplit("/", 1)[-1]
        self._send(HTTPStatus.OK, body, "application/octet-stream",
                   {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"})


def _int(value: str | None, default: int) -> int:
    try:
        return max(0, int(value)) if value else default
    except ValueError:
        raise UsageError(f"not a number: {value!r}") from None
