"""One run as HTML: the DAG coloured by status (an inline SVG laid out here), each stage's reason, duration,
resources and artifacts, metrics with their trend chart, params, cache ingredients and log tails.

`pipe report` writes `render(page)`: one self-contained file, CSS and SVG inline, no script and no URL to fetch,
so it opens anywhere without a network. The web UI serves the same sections with links (`Links`) and its own
script. Every text from a stage, a file or a log is escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.compare import run_params
from orchestrator.plots import PlotData
from orchestrator.spec import Pipeline
from orchestrator.store.records import RunInfo, StageRunInfo
from orchestrator.units import format_bytes, format_duration

COLOURS = {"succeeded": "#2e9e44", "cached": "#1b8fb3", "failed": "#d33a2c", "skipped": "#c9a100",
           "cancelled": "#9c3fb5", "running": "#2f6fdb", "interrupted": "#9c3fb5", "queued": "#9aa0a6"}
CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header{background:#1d2329;color:#fff;padding:10px 20px;display:flex;gap:18px;align-items:center}
header a{color:#cfe3ff;text-decoration:none} header b{font-size:16px}
main{padding:16px 20px;max-width:1200px}
h1{font-size:20px;margin:6px 0} h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
table{border-collapse:collapse;background:#fff;width:100%} td,th{padding:4px 8px;border-bottom:1px solid #eceff2;
text-align:left;vertical-align:top} th{background:#eef1f4;font-weight:600;cursor:default}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-size:12px;font-weight:600}
pre{background:#11161b;color:#e6e6e6;padding:8px 10px;overflow:auto;max-height:320px;font-size:12px;margin:4px 0}
.muted{color:#68717b} .mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.dag{background:#fff;border:1px solid #dde1e6;overflow:auto} .dag .node{cursor:pointer}
.dag text{font-size:12px;fill:#fff} .dag .edge{stroke:#8a939c;stroke-width:1.5;fill:none}
.chart svg{max-width:100%;height:auto;background:#fff} details{margin:4px 0}
.gate-failed{color:#d33a2c;font-weight:700} .up{color:#2e9e44} .down{color:#d33a2c}
input,select{font:inherit;padding:3px 6px} .toolbar{margin:8px 0;display:flex;gap:10px;align-items:center}
"""


@dataclass(frozen=True)
class RunPage:
    pipeline: Pipeline
    run: RunInfo
    needs: dict[str, tuple[str, ...]]  # stage -> upstream stages, from the pipeline file (and the run's stages)
    log_tails: dict[str, str]  # stage -> last lines of its log ("" when it has none)
    plot: PlotData
    pruned_at: datetime | None
    promoted: str | None
    chart_svg: str = ""  # the trend chart, inline (empty: no metrics, or matplotlib missing: `chart_note`)
    chart_note: str = ""


@dataclass(frozen=True)
class Links:
    """URLs of the web UI; the report has none (it is one file)."""

    artifact: Callable[[str, str, str], str]  # (run id, stage, path) -> download URL
    log: Callable[[str, str], str]  # (run id, stage) -> the whole log


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def status_of(stage: StageRunInfo) -> str:
    return stage.status.value if stage.status is not None else "running"


def badge(status: str) -> str:
    return f'<span class="badge status-{esc(status)}" style="background:{COLOURS.get(status, "#68717b")}">' \
           f"{esc(status)}</span>"


def document(title: str, body: str, nav: str = "", script: str = "") -> str:
    head = f"<header><b>pipe</b>{nav}</header>" if nav else ""
    tail = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f"<body>{head}<main>{body}</main>{tail}</body></html>")


def render(page: RunPage) -> str:
    """The self-contained report (`pipe report`)."""
    return document(f"pipe report: {page.pipeline.display_name} run {page.run.id}", sections(page))


def sections(page: RunPage, links: Links | None = None) -> str:
    run = page.run
    took = format_duration(run.duration_s) if run.duration_s is not None else "running"
    promoted = " · <b>promoted</b>" if page.promoted == run.id else ""
    parts = [
        f'<h1>{esc(page.pipeline.display_name)} · run <span class="mono" id="run-id">{esc(run.id)}</span></h1>',
        (f'<p id="run-status">{badge(str(run.status))} {esc(run.trigger)} · started '
        f"{esc(_when(run.started_at))} · took {esc(took)}"
        f'{" · git " + esc((run.git_commit or "")[:10]) if run.git_commit else ""}{promoted}</p>'),
    ]
    if page.pruned_at is not None:
        parts.append(f'<p class="muted">outputs pruned by gc on {esc(_when(page.pruned_at))}</p>')
    parts += ["<h2>Stages</h2>", dag_svg(page.needs, {s.stage: s for s in run.stages}), stage_table(page),
              "<h2>Metrics</h2>", metrics_section(page), "<h2>Params</h2>", params_table(run),
              "<h2>Artifacts</h2>", artifacts_table(run, links), "<h2>Logs</h2>", logs_section(page, links),
              "<h2>Cache ingredients</h2>", ingredients_section(run)]
    return "\n".join(parts)


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def layout(needs: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, int]]:
    """(column, row) of each stage: its column is its longest path from a root, rows in name order."""
    depth: dict[str, int] = {}

    def column(name: str, seen: frozenset[str] = frozenset()) -> int:
        if name not in depth:
            ups = [u for u in needs.get(name, ()) if u in needs and u not in seen]
            depth[name] = 1 + max((column(u, seen | {name}) for u in ups), default=-1)
        return depth[name]

    for name in sorted(needs):
        column(name)
    rows: dict[int, int] = {}
    place = {}
    for name in sorted(needs, key=lambda n: (depth[n], n)):
        place[name] = (depth[name], rows.get(depth[name], 0))
        rows[depth[name]] = rows.get(depth[name], 0) + 1
    return place


def dag_svg(needs: dict[str, tuple[str, ...]], stages: dict[str, StageRunInfo]) -> str:
    width_node, height_node, gap_x, gap_y, pad = 170, 46, 60, 18, 12
    place = layout(needs)
    columns = 1 + max((c for c, _ in place.values()), default=0)
    rows = 1 + max((r for _, r in place.values()), default=0)
    width = pad * 2 + columns * width_node + (columns - 1) * gap_x
    height = pad * 2 + rows * height_node + (rows - 1) * gap_y

    def xy(name: str) -> tuple[int, int]:
        col, row = place[name]
        return pad + col * (width_node + gap_x), pad + row * (height_node + gap_y)

    edges, nodes = [], []
    for name in sorted(place):
        x1, y1 = xy(name)
        for up in needs.get(name, ()):
            if up in place:
                x0, y0 = xy(up)
                sx, sy, ex, ey = x0 + width_node, y0 + height_node // 2, x1, y1 + height_node // 2
                mid = (sx + ex) // 2
                edges.append(f'<path class="edge" data-from="{esc(up)}" data-to="{esc(name)}" '
                             f'd="M{sx},{sy} C{mid},{sy} {mid},{ey} {ex - 6},{ey}" marker-end="url(#arrow)"/>')
        record = stages.get(name)
        status = status_of(record) if record is not None else "queued"
        reason = record.reason if record is not None else "not in this run"
        took = format_duration(record.duration_s) if record is not None and record.duration_s is not None else ""
        label = f"{status} {took}".strip()
        nodes.append(
            f'<g class="node status-{esc(status)}" id="node-{esc(name)}" data-stage="{esc(name)}" '
            f'data-status="{esc(status)}"><title>{esc(name)}: {esc(status)}{": " + esc(reason) if reason else ""}'
            f'</title><rect x="{x1}" y="{y1}" width="{width_node}" height="{height_node}" rx="7" '
            f'fill="{COLOURS.get(status, "#68717b")}"/><text x="{x1 + 10}" y="{y1 + 19}" font-weight="700">'
            f'{esc(_short(name, 22))}</text><text class="node-status" x="{x1 + 10}" y="{y1 + 36}">'
            f"{esc(_short(label, 24))}</text></g>")
    marker = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#8a939c"/></marker></defs>')
    return (f'<div class="dag"><svg id="dag" role="img" aria-label="stage graph" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{marker}{"".join(edges)}{"".join(nodes)}</svg></div>')


def _short(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"


def stage_table(page: RunPage) -> str:
    rows = []
    for s in page.run.stages:
        spec = page.pipeline.stages.get(s.stage)
        res = page.pipeline.resources_of(s.stage) if spec is not None else None
        limits = ", ".join(part for part in (
            f"{res.cpus:g} cpus" if res and res.cpus else "", f"{format_bytes(res.memory)} memory" if res and
            res.memory else "", f"{res.gpus} gpus" if res and res.gpus else "") if part)
        used = ", ".join(part for part in (
            f"peak {format_bytes(s.peak_memory_bytes)}" if s.peak_memory_bytes else "",
            f"cpu {format_duration(s.cpu_seconds)}" if s.cpu_seconds else "") if part)
        reason = esc(s.reason)
        if s.gate_passed is False:
            reason = f'<span class="gate-failed">{reason}</span>'
        warnings = "".join(f'<div class="muted">warning: {esc(w)}</div>' for w in s.warnings)
        rows.append(
            f'<tr id="stage-{esc(s.stage)}" data-stage="{esc(s.stage)}"><td><b>{esc(s.stage)}</b></td>'
            f'<td class="stage-status">{badge(status_of(s))}</td><td class="stage-reason">{reason}{warnings}</td>'
            f"<td>{esc(format_duration(s.duration_s) if s.duration_s is not None else '')}</td>"
            f"<td>{esc(used)}</td><td>{esc(limits)}</td><td>{esc(s.attempts)}</td>"
            f"<td>{esc('' if s.exit_code is None else s.exit_code)}</td>"
            f'<td class="mono">{esc((s.image_id or "")[:19])}</td></tr>')
    return ('<table id="stages"><thead><tr><th>stage</th><th>status</th><th>reason</th><th>time</th><th>used</th>'
            f'<th>limits</th><th>attempts</th><th>exit</th><th>image</th></tr></thead><tbody>{"".join(rows)}'
            "</tbody></table>")


def metrics_section(page: RunPage) -> str:
    values = [(s.stage, name, value) for s in page.run.stages for name, value in sorted(s.metrics.items())]
    if not values:
        table = '<p class="muted">this run recorded no metrics</p>'
    else:
        table = "<table id=\"metrics\"><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>" + "".join(
            f"<tr><td>{esc(stage)}.{esc(name)}</td><td>{value:.6g}</td></tr>" for stage, name, value in values
        ) + "</tbody></table>"
    chart = f'<div class="chart" id="trend">{page.chart_svg}</div>' if page.chart_svg else \
        (f'<p class="muted">{esc(page.chart_note)}</p>' if page.chart_note else "")
    return table + chart


def params_table(run: RunInfo) -> str:
    params = run_params(run)
    if not params:
        return '<p class="muted">no params</p>'
    overridden = _flatten_override(run.params_override)
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td class=\"mono\">{esc(json.dumps(value, ensure_ascii=False))}</td>"
        f"<td>{'-p' if name in overridden else ''}</td></tr>" for name, value in sorted(params.items()))
    return f'<table id="params"><thead><tr><th>param</th><th>value</th><th></th></tr></thead><tbody>{rows}</tbody></table>'


def _flatten_override(overrides: dict[str, Any]) -> set[str]:
    return {key.lstrip("+") for key in overrides}


def artifacts_table(run: RunInfo, links: Links | None) -> str:
    rows = []
    for s in run.stages:
        for a in s.artifacts:
            name = esc(a.path)
            if links is not None:
                name = f'<a href="{esc(links.artifact(run.id, s.stage, a.path))}" download>{name}</a>'
            rows.append(f"<tr><td>{esc(s.stage)}</td><td class=\"mono\">{name}</td><td>{esc(format_bytes(a.size))}"
                        f'</td><td class="mono" title="{esc(a.digest)}">{esc(a.digest[:16])}</td></tr>')
    if not rows:
        return '<p class="muted">no artifacts</p>'
    return ('<table id="artifacts"><thead><tr><th>stage</th><th>path</th><th>size</th><th>digest</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def logs_section(page: RunPage, links: Links | None) -> str:
    parts = []
    for s in page.run.stages:
        tail = page.log_tails.get(s.stage, "")
        more = f' · <a href="{esc(links.log(page.run.id, s.stage))}">whole log</a>' if links else ""
        failed = s.status is not None and s.status.value == "failed"
        parts.append(f'<details id="log-{esc(s.stage)}" data-stage="{esc(s.stage)}"{" open" if failed else ""}>'
                     f"<summary>{esc(s.stage)} {badge(status_of(s))}{more}</summary>"
                     f'<pre class="log-tail">{esc(tail) if tail else "(no log)"}</pre></details>')
    return "".join(parts)


def ingredients_section(run: RunInfo) -> str:
    parts = []
    for s in run.stages:
        data = s.to_json()["ingredients"]
        key = f" key {esc((s.cache_key or '')[:16])}" if s.cache_key else ""
        origin = f" · restored from run {esc(s.cached_from)}" if s.cached_from else ""
        body = esc(json.dumps(data, indent=2, sort_keys=True)) if data else "(none recorded)"
        parts.append(f'<details class="ingredients" data-stage="{esc(s.stage)}"><summary>{esc(s.stage)}{key}{origin}'
                     f"</summary><pre>{body}</pre></details>")
    return "".join(parts)
