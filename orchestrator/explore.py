"""The read-only use cases that look back over history: compare two runs, the metrics table, plots, the HTML
report and the data the web UI serves. Beside api.py (same layer) and built on it: every one opens the history
with `api.read_store`, which never creates, migrates or writes anything.

Run references: an id or a unique prefix of one, `latest`, `latest~N` (N runs before the latest), and
`promoted` (the served run, or where nothing was ever served the latest succeeded run that passed its gates):
`promoted_run` is the one place that says so.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from orchestrator import api
from orchestrator.compare import Comparison, compare, run_metrics, run_params

__all__ = ["Comparison", "History", "compare", "history", "promoted_run", "resolve_run"]
from orchestrator.errors import NotFound, UsageError
from orchestrator.plots import PlotData, Point, Series
from orchestrator.report import RunPage
from orchestrator.results import RunStatus, StageStatus
from orchestrator.spec import Pipeline
from orchestrator.store.records import RunInfo, StageRunInfo

if TYPE_CHECKING:
    from orchestrator.store.store import Store

PROMOTED = "promoted"
_BACK = re.compile(r"latest~(\d+)")
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class History:
    """An open, read-only history of one pipeline: what the web UI keeps for a request."""

    loaded: api.Loaded
    store: Store

    @property
    def pipeline(self) -> Pipeline:
        return self.loaded.pipeline

    @property
    def name(self) -> str:
        return self.loaded.pipeline.display_name


@contextmanager
def history(target: api.Target) -> Iterator[History]:
    loaded = api.load(target)
    with api.read_store(loaded) as store:
        yield History(loaded, store)


def promoted_run(h: History) -> RunInfo | None:
    """The run that counts as promoted: the one serving history says is served (promoted, rolled back to, or
    started: serving.current_run); with no serving history, the latest succeeded run in which a stage passed its
    gate, or the latest succeeded run when no stage has one."""
    from orchestrator.serving import current_run

    run_id = current_run(h.store.serve_events(h.name, limit=None))
    if run_id is None:
        gated = any(s.gate is not None for s in h.pipeline.stages.values())
        run_id = h.store.latest_gate_pass(h.name) if gated else h.store.latest_success_run(h.name)
    return h.store.get_run(run_id, h.name) if run_id else None


def resolve_run(h: History, ref: str) -> RunInfo:
    if ref == PROMOTED:
        if (run := promoted_run(h)) is None:
            raise NotFound(f"pipeline {h.name} has no promoted run yet (nothing served, no succeeded run passed its gates)")
        return run
    if match := _BACK.fullmatch(ref):
        back = int(match.group(1))
        found = h.store.runs_window(h.name, limit=1, offset=back, with_stages=False)
        if not found:
            raise NotFound(f"{ref}: pipeline {h.name} has {h.store.count_runs(h.name)} runs")
        return h.store.get_run(found[0].id, h.name)
    return h.store.get_run(ref, h.name)


def compare_runs(target: api.Target, a: str, b: str) -> Comparison:
    with history(target) as h:
        return compare(resolve_run(h, a), resolve_run(h, b))


# ---- the metrics table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsRow:
    run: RunInfo
    params: dict[str, Any]
    metrics: dict[str, float]
    repeats: tuple[str, ...] = ()  # later runs that restored these metrics from the cache (collapsed here)

    @property
    def gate_failed(self) -> str | None:
        """The reason of a stage that failed its gate, or None."""
        return next((s.reason for s in self.run.stages if s.gate_passed is False), None)

    @property
    def cached_from(self) -> str | None:
        """The run this one's metrics were restored from, when every metrics stage was cached."""
        metric_stages = [s for s in self.run.stages if s.metrics]
        if metric_stages and all(s.status is StageStatus.CACHED and s.cached_from for s in metric_stages):
            return metric_stages[0].cached_from
        return None

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run.id, "started_at": self.run.to_json()["started_at"],
                "status": str(self.run.status), "trigger": self.run.trigger, "gate_failed": self.gate_failed,
                "params": self.params, "metrics": self.metrics, "cached_from": self.cached_from,
                "repeats": list(self.repeats)}


@dataclass(frozen=True)
class MetricsTable:
    rows: list[MetricsRow]  # newest first, or by the sort metric
    metric_names: list[str]
    varying_params: list[str]  # the params whose value differs between the rows (the table's param columns)

    def to_json(self) -> list[dict[str, Any]]:
        return [row.to_json() for row in self.rows]


def metric_names(available: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """The metrics `--metric` names: `r2` matches `evaluate.r2` (and any `stage.r2`); none given: all."""
    available, wanted = sorted(set(available)), list(wanted)
    if not wanted:
        return available
    chosen: list[str] = []
    for want in wanted:
        found = [name for name in available if name == want or name.endswith(f".{want}")]
        if not found:
            raise UsageError(f"no metric {want!r} in history; recorded: {', '.join(available) or 'none'}")
        chosen += [name for name in found if name not in chosen]
    return chosen


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """`7d`, `12h` (that long ago), `2026-01-31` or an ISO time (local when it has no zone)."""
    if value is None:
        return None
    from orchestrator.units import parse_duration

    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--since {value!r}: give a duration (7d, 12h) or a date (2026-01-31)") from None
    return moment.astimezone(UTC)


def metrics_table(target: api.Target, *, since: str | None = None, limit: int = 20, all_runs: bool = False,
                  metrics: Iterable[str] = (), sort: bool = False, ascending: bool = False) -> MetricsTable:
    """Runs newest first with their params, status and metrics; a run whose metrics stages were all restored
    from the cache is folded into the row of the run they came from (`repeats`) unless `all_runs`."""
    with history(target) as h:
        rows = _metric_rows(h, parse_since(since), limit, all_runs)
    names = metric_names((n for r in rows for n in r.metrics), metrics)
    if metrics:
        rows = [replace(r, metrics={n: v for n, v in r.metrics.items() if n in names}) for r in rows]
    if sort:
        if not names:
            raise UsageError("--sort needs a metric in history")
        key = names[0]
        present = [r for r in rows if key in r.metrics]
        present.sort(key=lambda r: r.metrics[key], reverse=not ascending)
        rows = present + [r for r in rows if key not in r.metrics]
    varying = sorted({k for r in rows for k in r.params if len({repr(x.params.get(k)) for x in rows}) > 1})
    return MetricsTable(rows, names, varying)


def _metric_rows(h: History, since: datetime | None, limit: int, all_runs: bool) -> list[MetricsRow]:
    runs: list[RunInfo] = []
    page = max(50, limit * 2)
    while True:  # more pages until `limit` rows show and every repeat among them has found its origin
        batch = h.store.runs_window(h.name, since=since, limit=page, offset=len(runs))
        runs += batch
        rows, unseen = _collapse(runs, all_runs)
        if len(batch) < page or (len(rows) >= limit and not unseen):
            return rows[:limit]


def _collapse(runs: list[RunInfo], all_runs: bool) -> tuple[list[MetricsRow], set[str]]:
    """Rows of `runs` (newest first), repeats folded into their origin's row; and the origins not among them."""
    ids = {run.id for run in runs}
    repeats: dict[str, list[str]] = {}
    rows, unseen = [], set()
    for run in runs:
        row = MetricsRow(run, run_params(run), run_metrics(run))
        origin = row.cached_from
        if not all_runs and origin is not None:
            if origin in ids:
                repeats.setdefault(origin, []).append(run.id)
                continue
            unseen.add(origin)
        rows.append(row)
    return [replace(r, repeats=tuple(repeats.get(r.run.id, ()))) for r in rows], unseen


# ---- plots -----------------------------------------------------------------------------------------------------


def plot_data(h: History, names: Iterable[str] = (), limit: int = 200) -> PlotData:
    """Each metric across the latest `limit` runs that recorded it, with its gate's thresholds."""
    points = h.store.metric_history(h.name, limit)
    chosen = metric_names((f"{p.stage}.{p.name}" for p in points), names)
    total = h.store.count_runs(h.name)
    ids = [run.id for run in h.store.runs_window(h.name, limit=total, with_stages=False)]
    number = {run_id: total - i for i, run_id in enumerate(ids)}
    series = []
    for name in chosen:
        mine = sorted((p for p in points if f"{p.stage}.{p.name}" == name), key=lambda p: (p.started_at, p.run_id))
        series.append(Series(name, [Point(p.run_id, number.get(p.run_id, 0), p.started_at, p.value) for p in mine],
                             _gate_lines(h, name)))
    promoted = promoted_run(h)
    return PlotData(series, promoted.id if promoted else None)


def _gate_lines(h: History, name: str) -> list[tuple[str, float]]:
    stage_name, _, metric = name.partition(".")
    stage = h.pipeline.stages.get(stage_name)
    gate = stage.gate if stage is not None else None
    if gate is None or gate.metric != metric:
        return []
    lines = [(f"gate min {gate.min:g}", float(gate.min)) if gate.min is not None else None,
             (f"gate max {gate.max:g}", float(gate.max)) if gate.max is not None else None]
    if gate.max_drop is not None and (baseline := h.store.gate_baseline(h.name, stage_name, metric)):
        lines.append((f"max_drop floor ({baseline[1]:.4g} - {gate.max_drop:g})", baseline[1] - gate.max_drop))
    return [line for line in lines if line is not None]


def plot(target: api.Target, names: Iterable[str], out: Path, x: str = "run", limit: int = 200) -> PlotData:
    """Draw the metrics across runs into `out` (.png or .svg)."""
    from orchestrator import plots

    with history(target) as h:
        data = plot_data(h, names, limit)
    if not any(s.points for s in data.series):
        raise NotFound(f"pipeline {api.load(target).pipeline.display_name} has no metrics in history yet")
    plots.write(data, out, x=x)
    return data


def plot_series(target: api.Target, names: Iterable[str] = (), limit: int = 200) -> PlotData:
    with history(target) as h:
        return plot_data(h, names, limit)


# ---- one run's page: the report and the web UI --------------------------------------------------------------


def run_page(h: History, ref: str, tail_lines: int = LOG_TAIL_LINES) -> RunPage:
    run = resolve_run(h, ref)
    needs = {name: tuple(n for n in s.needs) for name, s in h.pipeline.stages.items()}
    for s in run.stages:
        needs.setdefault(s.stage, ())
    tails = {s.stage: log_tail(_log_of(h, run, s), tail_lines) for s in run.stages}
    data = plot_data(h, (), limit=200)
    from orchestrator import prune

    chart, note = chart_svg(data)
    return RunPage(h.pipeline, run, needs, tails, data, prune.pruned_at(h.loaded.state, run.id), data.promoted,
                   chart, note)


def chart_svg(data: PlotData, x: str = "run") -> tuple[str, str]:
    """(inline SVG chart, "") or ("", why there is none): no metrics yet, or matplotlib is not installed."""
    from orchestrator import plots

    if not any(s.points for s in data.series):
        return "", ""
    try:
        return plots.svg(data, x=x), ""
    except UsageError as e:
        return "", str(e)


def _log_of(h: History, run: RunInfo, stage: StageRunInfo) -> Path | None:
    """A stage's log; a cached stage's is the one of the run it was restored from."""
    if stage.log_path:
        return Path(stage.log_path)
    if stage.status is StageStatus.CACHED and stage.cached_from:
        try:
            origin = h.store.get_run(stage.cached_from, h.name).stage(stage.stage)
        except NotFound:
            return None
        return Path(origin.log_path) if origin and origin.log_path else None
    return None


def log_tail(path: Path | None, lines: int) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def write_report(target: api.Target, ref: str, out: Path) -> RunPage:
    """`pipe report`: one self-contained HTML file (CSS, SVG and script inline; nothing fetched to open it)."""
    from orchestrator import report

    with history(target) as h:
        page = run_page(h, ref)
    out.write_text(report.render(page), encoding="utf-8")
    return page


def is_live(run: RunInfo) -> bool:
    return run.status is RunStatus.RUNNING


def open_artifact(h: History, ref: str, stage: str, rel: str) -> BinaryIO:
    """One artifact of one run, opened for reading: only a path the stage recorded as an artifact, inside its
    outputs folder inside the state folder, a regular file reached through no symlink. NotFound otherwise."""
    run = resolve_run(h, ref)
    record = run.stage(stage)
    missing = NotFound(f"run {run.id} has no artifact {rel!r} of stage {stage!r}")
    if record is None or not record.outputs_path or rel not in {a.path for a in record.artifacts}:
        raise missing
    if not os.path.isdir(record.outputs_path):  # a cluster run left it in the remote (--fetch), or pruned
        raise NotFound(f"the outputs of stage {stage!r} of run {run.id} are not on this host: "
                       f"`pipe pull {run.id} --stage {stage}` brings them")
    state = os.path.realpath(h.loaded.state.root)
    root = os.path.realpath(record.outputs_path)
    full = os.path.join(root, rel)
    if not root.startswith(state + os.sep) or os.path.realpath(full) != os.path.normpath(full) \
            or not full.startswith(root + os.sep):
        raise missing
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise missing from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise missing
    return f
