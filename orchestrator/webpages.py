"""The web UI's pages (HTML, escaped) and its one script, served as /static/app.js (no inline script: the CSP
allows only the UI's own). The run page is report.py's sections with links and live updates."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from orchestrator.compare import show_value
from orchestrator.report import COLOURS, Links, RunPage, badge, document, esc, sections
from orchestrator.store.records import RunInfo
from orchestrator.units import format_duration

__all__ = ["esc"]


def nav(current: str) -> str:
    items = [("/", "Runs"), ("/metrics", "Metrics"), ("/compare", "Compare"), ("/schedules", "Schedules")]
    return "".join(f'<a href="{href}"{" aria-current=page" if href == current else ""}>{label}</a>'
                   for href, label in items)


def page(title: str, current: str, body: str, kind: str, data: dict[str, str] | None = None) -> str:
    attributes = "".join(f' data-{k}="{esc(v)}"' for k, v in (data or {}).items())
    text = document(title, body, nav(current), "")
    text = text.replace("<body>", f'<body data-page="{kind}"{attributes}>', 1)
    text = text.replace("</head>", '<link rel="icon" href="data:,"></head>', 1)  # no /favicon.ico 404
    return text.replace("</body>", '<script src="/static/app.js"></script></body>', 1)


def runs_page(pipeline: str) -> str:
    body = (f"<h1>{esc(pipeline)} · runs</h1>"
            '<div class="toolbar"><input id="filter" type="search" placeholder="filter: id, status, param, trigger">'
            '<select id="status-filter"><option value="">any status</option>'
            + "".join(f'<option value="{s}">{s}</option>' for s in
                      ("running", "succeeded", "failed", "cancelled", "interrupted"))
            + '</select><span class="muted" id="runs-count"></span><span class="muted" id="live-note"></span></div>'
            '<table id="runs"><thead></thead><tbody></tbody></table>')
    return page(f"pipe · {pipeline} runs", "/", body, "runs")


def links() -> Links:
    return Links(artifact=lambda run, stage, path: f"/runs/{quote(run)}/artifacts/{quote(stage)}/{quote(path)}",
                 log=lambda run, stage: f"/runs/{quote(run)}/logs/{quote(stage)}")


def run_page(view: RunPage) -> str:
    panel = ('<h2 id="log-title">Log</h2><p class="muted" id="log-hint">click a stage in the graph to follow its log'
             '</p><pre id="log-view" hidden></pre>')
    body = sections(view, links()).replace("<h2>Metrics</h2>", panel + "<h2>Metrics</h2>", 1)
    live = "1" if view.run.status.value == "running" else "0"
    return page(f"pipe · run {view.run.id}", "", body, "run", {"run": view.run.id, "live": live})


def metrics_page(pipeline: str, table: Any, charts: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{esc(p)}</th>" for p in table.varying_params) + \
        "".join(f"<th>{esc(n)}</th>" for n in table.metric_names)
    rows = []
    for row in table.rows:
        status = badge(str(row.run.status))
        if row.gate_failed:
            status = f'<span class="gate-failed" title="{esc(row.gate_failed)}">gate failed</span>'
        if row.repeats:
            status += f' <span class="muted">+{len(row.repeats)} cached</span>'
        cells = "".join(f'<td class="mono">{esc(show_value(row.params.get(p)))}</td>' for p in table.varying_params)
        cells += "".join(f"<td>{'' if row.metrics.get(n) is None else f'{row.metrics[n]:.4g}'}</td>"
                         for n in table.metric_names)
        rows.append(f'<tr data-run-id="{esc(row.run.id)}"><td><a class="mono" href="/runs/{quote(row.run.id)}">'
                    f"{esc(row.run.id)}</a></td><td>{status}</td>{cells}</tr>")
    figures = "".join(f'<h2>{esc(name)}</h2><div class="chart" data-metric="{esc(name)}">{svg}</div>'
                      for name, svg in charts) or '<p class="muted">no metrics in history yet</p>'
    body = (f"<h1>{esc(pipeline)} · metrics</h1>{figures}<h2>Table</h2>"
            f'<table id="metrics-table"><thead><tr><th>run</th><th>status</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')
    return page(f"pipe · {pipeline} metrics", "/metrics", body, "metrics")


def compare_page(pipeline: str, runs: list[RunInfo], a: str, b: str, comparison: Any, problem: str) -> str:
    def chooser(name: str, chosen: str) -> str:
        refs = [("latest", "latest"), ("latest~1", "latest~1"), ("promoted", "promoted")] + \
            [(r.id, f"{r.id} · {r.status}") for r in runs]
        options = "".join(f'<option value="{esc(v)}"{" selected" if v == chosen else ""}>{esc(label)}</option>'
                          for v, label in refs)
        return f'<label>{name.upper()} <select name="{name}" id="pick-{name}">{options}</select></label>'

    form = (f'<form class="toolbar" method="get" action="/compare">{chooser("a", a)}{chooser("b", b)}'
            '<button type="submit">Compare</button>'
            f'<a class="muted" href="/api/compare?{esc(urlencode({"a": a, "b": b}))}">json</a></form>')
    if comparison is None:
        return page(f"pipe · {pipeline} compare", "/compare", f"<h1>Compare</h1>{form}<p>{esc(problem)}</p>",
                    "compare")
    params = "".join(f"<tr><td>{esc(c.name)}</td><td class=\"mono\">{esc(show_value(c.a))}</td>"
                     f'<td class="mono">{esc(show_value(c.b))}</td></tr>' for c in comparison.params) \
        or '<tr><td colspan="3" class="muted">the same params</td></tr>'
    metrics = "".join(
        f"<tr><td>{esc(m.name)}</td><td>{_num(m.a)}</td><td>{_num(m.b)}</td>"
        f'<td class="{"up" if (m.delta or 0) > 0 else "down" if (m.delta or 0) < 0 else ""}">'
        f"{'' if m.delta is None else f'{m.delta:+.4g}'}"
        f"{'' if m.relative is None else f' ({m.relative:+.1%})'}</td></tr>" for m in comparison.metrics)
    stages = "".join(
        f"<tr><td>{esc(s.stage)}</td><td>{badge(s.status_a) if s.status_a else '-'}</td>"
        f"<td>{badge(s.status_b) if s.status_b else '-'}</td><td>{'yes' if s.reran else ''}</td>"
        f"<td>{esc('; '.join(s.reasons))}</td><td>{_dur(s.duration_a)}</td><td>{_dur(s.duration_b)}</td>"
        f"<td>{'changed' if s.image_a != s.image_b else ''}</td><td>{'changed' if s.outputs_differ else ''}</td>"
        "</tr>" for s in comparison.stages)
    body = (f"<h1>Compare</h1>{form}<p>A <a class=\"mono\" href=\"/runs/{quote(comparison.a.id)}\">"
            f"{esc(comparison.a.id)}</a> {badge(str(comparison.a.status))} · B <a class=\"mono\" "
            f'href="/runs/{quote(comparison.b.id)}">{esc(comparison.b.id)}</a> {badge(str(comparison.b.status))}</p>'
            f'<h2>Params that differ</h2><table id="compare-params"><thead><tr><th>param</th><th>A</th><th>B</th>'
            f"</tr></thead><tbody>{params}</tbody></table>"
            '<h2>Metrics</h2><table id="compare-metrics"><thead><tr><th>metric</th><th>A</th><th>B</th>'
            f"<th>change</th></tr></thead><tbody>{metrics}</tbody></table>"
            '<h2>Stages</h2><table id="compare-stages"><thead><tr><th>stage</th><th>A</th><th>B</th><th>re-ran</th>'
            "<th>why / what differs</th><th>time A</th><th>time B</th><th>image</th><th>outputs</th></tr></thead>"
            f"<tbody>{stages}</tbody></table>")
    return page(f"pipe · {pipeline} compare", "/compare", body, "compare")


def schedules_page(pipeline: str, report: Any, problem: str) -> str:
    if report is None:
        body = f"<h1>{esc(pipeline)} · schedule</h1><p>{esc(problem)}</p>"
    else:
        sched = report.pipeline.schedule
        times = "".join(f"<li>{esc(t.astimezone().strftime('%Y-%m-%d %H:%M %Z'))}</li>" for t in report.next_times)
        ticks = "".join(
            f"<tr><td>{esc(t.due_at.astimezone().strftime('%Y-%m-%d %H:%M'))}</td><td>{badge(t.action)}</td>"
            f"<td>{esc(t.reason)}</td><td>" + (f'<a class="mono" href="/runs/{quote(t.run_id)}">{esc(t.run_id)}</a>'
                                              if t.run_id else "") + "</td></tr>" for t in report.ticks)
        body = (f"<h1>{esc(pipeline)} · schedule</h1><p class=\"mono\">{esc(sched.cron)} ({esc(sched.timezone)}), "
                f"overlap {esc(sched.overlap)}, catchup {esc(sched.catchup)}</p><h2>Next fire times</h2>"
                f'<ul id="next-times">{times}</ul><h2>Latest ticks</h2><table id="ticks"><thead><tr><th>due</th>'
                f"<th>action</th><th>reason</th><th>run</th></tr></thead><tbody>{ticks or ''}</tbody></table>")
    return page(f"pipe · {pipeline} schedule", "/schedules", body, "schedules")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _dur(seconds: float | None) -> str:
    return esc(format_duration(seconds)) if seconds is not None else ""


APP_JS = r"""
"use strict";
const COLOURS = __COLOURS__;
const $ = (sel, root) => (root || document).querySelector(sel);
const el = (tag, attrs, text) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text; return e; };
const badge = (status) => { const b = el("span", {class: "badge status-" + status}, status);
  b.style.background = COLOURS[status] || "#68717b"; return b; };
const statusOf = (s) => s.status || "running";
function flat(value, prefix, out) {
  for (const [k, v] of Object.entries(value || {})) {
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) flat(v, prefix + k + ".", out);
    else out[prefix + k] = JSON.stringify(v);
  }
  return out;
}
function duration(s) { if (s === null || s === undefined) return "";
  if (s < 60) return s.toFixed(1) + "s"; const m = Math.floor(s / 60); return m + "m" + Math.round(s % 60) + "s"; }

/* ---- runs table: filter, sort, live ---- */
const runsState = {runs: [], sort: "started", desc: true};
function runRow(run) {
  const params = {}, metrics = {};
  for (const s of run.stages) {
    if (s.ingredients) flat(s.ingredients.params, s.stage + ".", params);
    for (const [k, v] of Object.entries(s.metrics)) metrics[s.stage + "." + k] = v;
  }
  return {run, params, metrics, started: run.started_at, took: run.duration_s, status: run.status,
          trigger: run.trigger, id: run.id};
}
function renderRuns() {
  const rows = runsState.runs.map(runRow);
  const paramNames = [...new Set(rows.flatMap(r => Object.keys(r.params)))].sort()
    .filter(p => new Set(rows.map(r => r.params[p])).size > 1);
  const metricNames = [...new Set(rows.flatMap(r => Object.keys(r.metrics)))].sort();
  const cols = [["id", "run"], ["status", "status"], ["trigger", "trigger"], ["started", "started"],
    ["took", "took"], ...paramNames.map(p => ["p:" + p, p]), ...metricNames.map(m => ["m:" + m, m])];
  const value = (r, key) => key.startsWith("p:") ? r.params[key.slice(2)] :
    key.startsWith("m:") ? r.metrics[key.slice(2)] : r[key];
  const q = $("#filter").value.trim().toLowerCase(), status = $("#status-filter").value;
  let shown = rows.filter(r => (!status || r.status === status) &&
    (!q || [r.id, r.status, r.trigger, ...Object.entries(r.params).map(([k, v]) => k + "=" + v)]
      .join(" ").toLowerCase().includes(q)));
  const key = runsState.sort;
  shown.sort((a, b) => { const x = value(a, key), y = value(b, key);
    if (x === y) return 0; if (x === undefined || x === null) return 1; if (y === undefined || y === null) return -1;
    return (x < y ? -1 : 1) * (runsState.desc ? -1 : 1); });
  const head = el("tr");
  for (const [k, label] of cols) {
    const th = el("th", {"data-key": k}, label + (k === key ? (runsState.desc ? " ▾" : " ▴") : ""));
    th.addEventListener("click", () => { runsState.desc = runsState.sort === k ? !runsState.desc : true;
      runsState.sort = k; renderRuns(); });
    head.appendChild(th);
  }
  $("#runs thead").replaceChildren(head);
  const body = shown.map(r => {
    const tr = el("tr", {"data-run-id": r.id, "data-status": r.status});
    const link = el("a", {href: "/runs/" + encodeURIComponent(r.id), class: "mono"}, r.id);
    tr.appendChild(el("td")).appendChild(link);
    const failedGate = r.run.stages.some(s => s.gate_passed === false);
    const st = tr.appendChild(el("td")); st.appendChild(badge(r.status));
    if (failedGate) st.appendChild(el("span", {class: "gate-failed"}, " gate"));
    tr.appendChild(el("td", {}, r.trigger));
    tr.appendChild(el("td", {}, new Date(r.started).toLocaleString()));
    tr.appendChild(el("td", {}, r.status === "running" ? "running" : duration(r.took)));
    for (const p of paramNames) tr.appendChild(el("td", {class: "mono"}, r.params[p] === undefined ? "" : r.params[p]));
    for (const m of metricNames) tr.appendChild(el("td", {}, r.metrics[m] === undefined ? "" : String(+r.metrics[m].toPrecision(4))));
    return tr;
  });
  $("#runs tbody").replaceChildren(...body);
  $("#runs-count").textContent = shown.length + " of " + rows.length + " runs";
  $("#live-note").textContent = rows.some(r => r.status === "running") ? " · live" : "";
}
async function loadRuns() {
  try { const r = await fetch("/api/runs?limit=500"); if (r.ok) { runsState.runs = await r.json(); renderRuns(); } }
  finally { setTimeout(loadRuns, 1500); }
}

/* ---- a run: live states, log follow ---- */
function applyRun(run) {
  const status = $("#run-status .badge");
  if (status) status.replaceWith(badge(run.status));
  for (const s of run.stages) {
    const st = statusOf(s), node = document.getElementById("node-" + s.stage);
    if (node) { node.setAttribute("data-status", st); node.setAttribute("class", "node status-" + st);
      $("rect", node).setAttribute("fill", COLOURS[st] || "#68717b");
      $(".node-status", node).textContent = (st + " " + duration(s.duration_s)).trim();
      $("title", node).textContent = s.stage + ": " + st + (s.reason ? ": " + s.reason : ""); }
    const row = document.getElementById("stage-" + s.stage);
    if (row) { $(".stage-status", row).replaceChildren(badge(st)); $(".stage-reason", row).textContent = s.reason; }
  }
}
async function pollRun(runId) {
  const r = await fetch("/api/runs/" + encodeURIComponent(runId));
  if (!r.ok) return setTimeout(() => pollRun(runId), 2000);
  const run = await r.json(); applyRun(run);
  if (run.status === "running") setTimeout(() => pollRun(runId), 800);
}
let following = 0;
async function followLog(runId, stage) {
  const mine = ++following, view = $("#log-view");
  view.hidden = false; view.textContent = ""; $("#log-title").textContent = "Log · " + stage;
  $("#log-hint").textContent = "following"; let offset = 0;
  while (mine === following) {
    const r = await fetch("/runs/" + encodeURIComponent(runId) + "/logs/" + encodeURIComponent(stage) + "?offset=" + offset);
    if (!r.ok) { view.textContent = await r.text(); break; }
    const text = await r.text(); view.textContent += text; offset = +r.headers.get("X-Log-Offset");
    if (text) view.scrollTop = view.scrollHeight;
    if (r.headers.get("X-Stage-Running") !== "1") { $("#log-hint").textContent = "complete"; break; }
    await new Promise(ok => setTimeout(ok, 700));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const body = document.body;
  if (body.dataset.page === "runs") {
    $("#filter").addEventListener("input", renderRuns); $("#status-filter").addEventListener("change", renderRuns);
    loadRuns();
  } else if (body.dataset.page === "run") {
    const runId = body.dataset.run;
    for (const node of document.querySelectorAll(".dag .node"))
      node.addEventListener("click", () => followLog(runId, node.dataset.stage));
    if (body.dataset.live === "1") pollRun(runId);
  }
});
""".replace("__COLOURS__", json.dumps(COLOURS))
