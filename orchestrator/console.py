"""What people and programs see: Reporter implementations (a rich live view on a terminal, plain timestamped
lines elsewhere), tables for the history commands, and JSON. Knows nothing of Docker, SQL or scheduling."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.events import (
    BuildFinished,
    BuildProgress,
    BuildStarted,
    Event,
    Notice,
    Pushed,
    RunFinished,
    RunStarted,
    StageFinished,
    StageOutput,
    StagePlanned,
    StageRetrying,
    StageStarted,
)
from orchestrator.results import RunSummary, StageResult, StageStatus
from orchestrator.store.records import MetricPoint, RunInfo, StageRunInfo, iso_utc
from orchestrator.units import format_bytes, format_duration

if TYPE_CHECKING:
    from orchestrator.api import Forecast, GcResult, ScheduleReport, StatusReport, Validation
    from orchestrator.cache import GcReport, Manifest, VerifyReport
    from orchestrator.decide import Decision
    from orchestrator.plan import Plan
    from orchestrator.prune import DiskUse

STYLE = {
    "succeeded": "green", "cached": "cyan", "failed": "bold red", "skipped": "yellow", "cancelled": "magenta",
    "running": "blue", "queued": "dim", "interrupted": "magenta", "fired": "green", "coalesced": "cyan",
}
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    _err.print(Text(f"error: {message}", style="bold red" if _err.is_terminal else ""))


def warn(message: str) -> None:
    _err.print(Text(f"warning: {message}", style="yellow" if _err.is_terminal else ""))


def note(message: str) -> None:
    """A remark on stderr, so that stdout carries only what was asked for (a log, JSON)."""
    _err.print(Text(message, style="dim" if _err.is_terminal else ""))


def empty_log_note(stage: StageRunInfo, run_id: str) -> str:
    """What an empty log means: a stage that died before it wrote anything (an OOM kill) says so."""
    if stage.status is None:
        return f"stage {stage.stage} of run {run_id} has printed nothing yet"
    why = f"; it {stage.status.value}: {stage.reason.removeprefix(stage.status.value + ': ')}" if stage.reason else ""
    if stage.reason.startswith("killed: out of memory"):
        why = f"; it was {stage.reason}, before it wrote anything"
    return f"stage {stage.stage} of run {run_id} printed nothing{why}"


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """ "1 stage", "2 stages", "0 stages"; `nouns` for an irregular plural ("1 entry", "3 entries")."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def validation_json(report: Validation) -> dict[str, Any]:
    """`pipe validate --json` (api.Validation): {ok, pipeline, stages, ...} or {ok: false, errors: [...]}."""
    if report.pipeline is not None:
        pipeline = report.pipeline
        return {"ok": True, "file": str(pipeline.path), "pipeline": pipeline.display_name,
                "stages": len(pipeline.stages), "stage_names": list(pipeline.stages),
                "schedule": pipeline.schedule is not None, "errors": []}
    errors = []
    for error in report.errors:
        line = getattr(error, "line", None)
        errors.append({"file": str(error.file) if hasattr(error, "file") else None, "line": line,
                       "key": getattr(error, "key", None), "message": getattr(error, "problem", str(error)),
                       "exit_code": int(error.exit_code)})
    return {"ok": False, "errors": errors}


def dag_json(plan: Plan) -> dict[str, Any]:
    """`pipe dag --json`: nodes in run (topological) order with their needs, and edges upstream -> downstream."""
    edges = sorted(plan.graph.edges())
    return {"nodes": [{"name": name, "needs": sorted(up for up, down in edges if down == name)}
                      for name in plan.order],
            "edges": [{"from": up, "to": down} for up, down in edges]}


def make_reporter(stream: TextIO | None = None, live: bool | None = None) -> PlainReporter | LiveReporter:
    """A live view on a terminal; plain timestamped lines (no control codes) under cron and CI."""
    stream = stream or sys.stdout
    if live is None:
        live = stream.isatty()
    return LiveReporter(Console(file=stream) if stream is not sys.stdout else None) if live else PlainReporter(stream)


FAILURE_TAIL_LINES = 20  # of a failed stage's output, shown under the final table


def logs_hint(run_id: str, stage: str) -> str:
    return f"full log: pipe logs {run_id} {stage}"


class PlainReporter:
    """One timestamped line per event; the caller prints the summary table after the run."""

    shows_summary = False

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._run_id = ""

    def _line(self, text: str) -> None:
        stamp = datetime.now(UTC).astimezone().strftime("%H:%M:%S")
        with self._lock:
            self._stream.write(f"{stamp} {text}\n")
            self._stream.flush()

    def emit(self, event: Event) -> None:
        match event:
            case RunStarted(run_id=run_id, pipeline=name, stages=stages):
                self._run_id = run_id
                self._line(f"run {run_id} of {name}: {len(stages)} stage(s)")
            case StagePlanned(stage=stage, will_run=True, reasons=reasons):
                self._line(f"{stage}: runs: {', '.join(reasons)}")
            case StageOutput(stage=stage, line=line):
                self._line(f"{stage} | {line.rstrip()}")
            case StageRetrying(stage=stage, attempt=attempt, reason=reason, delay_s=delay):
                self._line(f"{stage}: attempt {attempt - 1} failed ({reason}); retrying in {delay:.1f}s")
            case StageFinished(result=result):
                self._line(describe_result(result))
                if result.status is StageStatus.FAILED and result.log_path and self._run_id:
                    self._line(f"{result.stage}: {logs_hint(self._run_id, result.stage)}")
            case RunFinished(summary=summary):
                self._line(f"run {summary.run_id} {summary.status} (exit {int(summary.exit_code)})")
            case Notice(message=message):
                self._line(f"warning: {message}")
            case Pushed():
                self._line(describe_pushed(event))
            case BuildStarted(stage=stage, context=context):
                self._line(f"{stage}: building image from {context}")
            case BuildFinished():
                self._line(describe_build(event))


def describe_result(result: StageResult) -> str:
    took = f" in {format_duration(result.duration_s)}" if result.duration_s is not None else ""
    reason = f": {result.reason.removeprefix(result.status.value + ': ')}" if result.reason else ""
    if result.status is StageStatus.SUCCEEDED:
        reason = ""  # the reasons it ran were printed when it started
    return f"{result.stage}: {result.status}{reason}{took}"


def describe_build(event: BuildFinished) -> str:
    took = format_duration(event.duration_s)
    if event.ok:
        return f"{event.stage}: image built in {took}"
    if event.log_path is None:
        return f"{event.stage}: image build {event.reason or 'stopped'} after {took}"
    return f"{event.stage}: image build failed after {took}; full log: {event.log_path}"


@dataclass
class _Row:
    status: str = "queued"
    reason: str = ""
    started: float | None = None
    took: float | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=3))  # shown while it runs
    last: deque[str] = field(default_factory=lambda: deque(maxlen=FAILURE_TAIL_LINES))  # shown if it fails


@dataclass
class _Build:
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    total: int = 0


class LiveReporter:
    """Images being built (one line each), then stages queued, running (elapsed), cached, done, failed, and the
    tail of the running stages' logs. The last frame is the run's summary; under it, the end of each failed
    stage's output. Everything that comes from a stage, a file or the engine is rendered as Text, never markup."""

    shows_summary = True

    def __init__(self, console: Console | None = None) -> None:
        self._rows: dict[str, _Row] = {}
        self._builds: dict[str, _Build] = {}
        self._lock = threading.Lock()
        self._console = console or Console()
        self._live: Live | None = None
        self._title = ""
        self._run_id = ""

    def emit(self, event: Event) -> None:
        # Live's refresh thread renders under self._lock: start and stop it outside the lock, or stop() would
        # wait for a refresh that waits for us.
        match event:
            case RunStarted(run_id=run_id, pipeline=name, stages=stages):
                with self._lock:
                    self._title, self._run_id = f"run {run_id} of {name}", run_id
                    self._rows = {s: _Row() for s in stages}
                self._start()
            case RunFinished():
                self._stop()
                self._print_failures()
            case BuildStarted(stage=stage):
                with self._lock:
                    self._builds[stage] = _Build()
                self._start()
            case BuildProgress(stage=stage, step=step, total=total):
                with self._lock:
                    build = self._builds.setdefault(stage, _Build())
                    build.step, build.total = step, total
            case BuildFinished():
                with self._lock:
                    self._builds.pop(event.stage, None)
                    idle = not self._builds and not self._rows
                self._print_build(event)
                if idle:
                    self._stop()
            case Notice(message=message):
                self._console.print(Text(f"warning: {message}", style="yellow"))
            case Pushed():
                self._console.print(Text(describe_pushed(event), style="dim"))
            case StagePlanned(stage=stage, will_run=will_run, reasons=reasons) if stage not in self._rows:
                self._console.print(Text(f"{stage}: {'runs' if will_run else 'cached'}: {', '.join(reasons)}"))
            case StageOutput(stage=stage, line=line) if stage not in self._rows:
                self._console.print(Text(f"{stage} | {line.rstrip()}", style="dim"))
            case _:
                with self._lock:
                    self._update(event)

    def _start(self) -> None:
        if self._live is None:
            self._live = Live(get_renderable=self._render, console=self._console, refresh_per_second=4)
            self._live.start()

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()  # its last frame stays on the screen
            self._live = None

    def _update(self, event: Event) -> None:
        match event:
            case StagePlanned(stage=stage, will_run=True, reasons=reasons):
                self._rows[stage].reason = ", ".join(reasons)
            case StageStarted(stage=stage):
                row = self._rows.setdefault(stage, _Row())
                row.status, row.started = "running", time.monotonic()
                row.last.clear()  # a retry: the failure shown is the last attempt's
            case StageOutput(stage=stage, line=line):
                row = self._rows[stage]
                row.tail.append(line.rstrip()[:160])
                row.last.append(line.rstrip())
            case StageRetrying(stage=stage, attempt=attempt, reason=reason):
                self._rows[stage].reason = f"retry {attempt}: {reason}"
            case StageFinished(result=result):
                row = self._rows.setdefault(result.stage, _Row())
                row.status, row.took = result.status.value, result.duration_s
                if result.status is not StageStatus.SUCCEEDED:
                    row.reason = result.reason
                row.tail.clear()

    def _print_build(self, event: BuildFinished) -> None:
        if event.ok:
            self._console.print(Text(describe_build(event), style="dim"))
            return
        if event.log_path is not None:  # failed: its whole output, then where it is kept
            self._console.print(Text(f"{event.stage}: image build failed; its output:", style="bold red"))
            try:
                with open(event.log_path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        self._console.print(Text(f"  {line.rstrip()}", style="dim"))
            except OSError:
                pass  # the error line names the file anyway
        self._console.print(Text(describe_build(event), style="red" if event.log_path else ""), soft_wrap=True)

    def _print_failures(self) -> None:
        with self._lock:
            failed = [(name, row) for name, row in self._rows.items() if row.status == StageStatus.FAILED.value]
        for name, row in failed:
            self._console.print(Text(f"{name} failed: {row.reason}", style="bold red"))
            if row.last:
                self._console.print(Text(f"last {len(row.last)} line(s) of its output:", style="dim"))
                for line in row.last:
                    self._console.print(Text(f"  {line}"))
            else:
                self._console.print(Text("  (it printed nothing)", style="dim"))
            self._console.print(Text(logs_hint(self._run_id, name), style="bold"), soft_wrap=True)

    def _render(self) -> Group:
        now = time.monotonic()
        with self._lock:
            builds = [
                Text(f"building {name}: " + (f"step {b.step}/{b.total}, " if b.total else "")
                     + f"{int(now - b.started)} s", style="blue")
                for name, b in self._builds.items()
            ]
            if not self._rows:
                return Group(*builds)
            table = Table(title=self._title, title_justify="left", expand=False, box=None, padding=(0, 1))
            for col in ("stage", "status", "time", "why"):
                table.add_column(col)
            tails: list[Text] = []
            for name, row in self._rows.items():
                took = row.took if row.took is not None else (now - row.started if row.started else None)
                table.add_row(
                    Text(name), Text(row.status, style=STYLE.get(row.status, "")),
                    format_duration(took) if took is not None else "", Text(row.reason[:80]),
                )
                tails += [Text(f"  {name} | {line}", style="dim") for line in row.tail]
        return Group(*builds, table, *tails)


# ---- history views ----------------------------------------------------------------------------------------------


def _table(*columns: str) -> Table:
    table = Table(box=None, padding=(0, 1), show_edge=False)
    for col in columns:
        table.add_column(Text(col))  # metric names come from a stage's file
    return table


def _status(stage: StageRunInfo) -> str:
    return stage.status.value if stage.status is not None else "running"


def _out() -> Console:
    """stdout; off a terminal, wide enough that tables do not wrap in logs and pipes."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _local_time(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else ""


def _dur(seconds: float | None) -> str:
    return format_duration(seconds) if seconds is not None else ""


def print_summary(summary: RunSummary) -> None:
    table = _table("stage", "status", "time", "reason")
    for result in summary.results.values():
        table.add_row(
            result.stage, Text(result.status.value, style=STYLE.get(result.status.value, "")),
            _dur(result.duration_s), Text(result.reason),
        )
    _out().print(table)


def print_stages(stages: tuple[StageRunInfo, ...], title: str) -> None:
    table = _table("stage", "status", "time", "peak mem", "cpu", "exit", "ran on", "reason")
    for s in stages:
        table.add_row(
            s.stage, Text(_status(s), style=STYLE.get(_status(s), "")), _dur(s.duration_s),
            format_bytes(s.peak_memory_bytes) if s.peak_memory_bytes else "",
            _dur(s.cpu_seconds), "" if s.exit_code is None else str(s.exit_code),
            Text(f"{s.executor} on {s.node or '?'}" if s.executor else ""), Text(s.reason or ""),
        )
    console = _out()
    console.print(Text(title, style="bold"))
    console.print(table)


def run_title(run: RunInfo) -> str:
    took = (run.finished_at - run.started_at).total_seconds() if run.finished_at and run.started_at else None
    return f"run {run.id} ({run.trigger}) {run.status} {_local_time(run.started_at)} {_dur(took)}".rstrip()


def print_runs(runs: list[RunInfo]) -> None:
    table = _table("run", "status", "trigger", "started", "took", "stages")
    for run in runs:
        took = (run.finished_at - run.started_at).total_seconds() if run.finished_at and run.started_at else None
        counts: dict[str, int] = {}
        for s in run.stages:
            counts[_status(s)] = counts.get(_status(s), 0) + 1
        table.add_row(
            run.id, Text(run.status, style=STYLE.get(run.status, "")), Text(run.trigger), _local_time(run.started_at),
            _dur(took), ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
        )
    _out().print(table)


def print_run(run: RunInfo) -> None:
    print_stages(run.stages, run_title(run))
    console = _out()
    for s in run.stages:
        if s.artifacts:
            console.print(Text(f"{s.stage} outputs ({s.outputs_path}):", style="bold"))
            for a in s.artifacts:
                console.print(Text(f"  {a.path}  {format_bytes(a.size)}  {a.digest[:12]}"))
        if s.metrics:
            console.print(Text(f"{s.stage} metrics:", style="bold"))
            for key, value in sorted(s.metrics.items()):
                console.print(Text(f"  {key} = {value:.6g}"))


def metrics_by_run(points: list[MetricPoint]) -> dict[str, dict[str, float]]:
    """{run id: {stage.metric: value}}, oldest run first."""
    runs: dict[str, dict[str, float]] = {}
    for p in sorted(points, key=lambda p: (p.started_at, p.run_id)):
        runs.setdefault(p.run_id, {})[f"{p.stage}.{p.name}"] = p.value
    return runs


def print_metrics(points: list[MetricPoint], diff: bool) -> None:
    runs = metrics_by_run(points)
    keys = sorted({key for values in runs.values() for key in values})
    table = _table("run", *keys)
    previous: dict[str, float] = {}
    for run_id, values in runs.items():
        cells = []
        for key in keys:
            if key not in values:
                cells.append("")
            elif diff and key in previous:
                cells.append(f"{values[key]:.4g} ({values[key] - previous[key]:+.4g})")
            else:
                cells.append(f"{values[key]:.4g}")
        previous.update(values)
        table.add_row(run_id, *cells)
    _out().print(table)


def schedule_json(report: ScheduleReport) -> dict[str, Any]:
    """`pipe schedule --json`: the schedule, its next fire times, and its latest ticks (api.ScheduleReport)."""
    schedule = report.schedule
    return {"pipeline": report.pipeline.display_name, "cron": schedule.cron, "timezone": schedule.timezone,
            "next": [iso_utc(at) for at in report.next_times], "ticks": [t.to_json() for t in report.ticks]}


def print_schedule(report: ScheduleReport) -> None:
    from zoneinfo import ZoneInfo

    schedule = report.schedule
    zone = ZoneInfo(schedule.timezone)
    console = _out()
    console.print(Text(f"{report.pipeline.display_name}: {schedule.cron!r} in {schedule.timezone}", style="bold"))
    for at in report.next_times:
        console.print(f"  {at:%Y-%m-%d %H:%M} UTC  ({at.astimezone(zone):%Y-%m-%d %H:%M %Z})", highlight=False)
    if not report.ticks:
        console.print("no ticks recorded yet (`pipe scheduler` records every tick it owes)")
        return
    table = _table("tick (UTC)", "action", "run", "reason")
    for tick in report.ticks:
        table.add_row(f"{tick.due_at:%Y-%m-%d %H:%M}", Text(tick.action, style=STYLE.get(tick.action, "")),
                      tick.run_id or "", Text(tick.reason))
    console.print(Text("latest ticks:", style="bold"))
    console.print(table)


def print_forecast(decisions: list[Decision]) -> None:
    """A dry run's plan, one line per stage: the same words as `pipe status`'s "next run"."""
    for d in decisions:
        if d.problem:
            warn(f"{d.stage}: {d.problem}")
    _print_lines([Text(f"{d.stage}: {decision_word(d)}: {', '.join(d.reasons)}") for d in decisions])


def _print_lines(lines: list[Text]) -> None:
    """One line per Text, a line per stage of a plan: off a terminal as plain text in one write (rich took
    0.2-0.4 s to lay out 5,000 lines that carry no style there: issue 20), on one as a single rich print that
    leaves long lines to the terminal (soft wrap) instead of measuring every word."""
    if not lines:
        return
    console = _out()
    if console.is_terminal:
        console.print(Text("\n").join(lines), soft_wrap=True)
    else:
        console.file.write("".join(f"{line.plain}\n" for line in lines))
        console.file.flush()


def decision_json(d: Decision) -> dict[str, Any]:
    return {"status": "would_run" if d.run else "cached", "runs": d.run, "reasons": list(d.reasons),
            "cache_key": d.ingredients.key() if d.ingredients is not None else None, "remote": d.remote}


def decision_word(d: Decision) -> str:
    return "runs" if d.run else "cached (remote)" if d.remote else "cached"


def forecast_json(forecast: Forecast) -> dict[str, Any]:
    """`pipe run --dry-run --json`: stable keys dry_run, status ("would_run" or "cached"), stages."""
    return {"dry_run": True, "run_id": None, "status": "would_run" if forecast.would_run else "cached",
            "stages": {d.stage: decision_json(d) for d in forecast.decisions}}


def result_json(result: StageResult) -> dict[str, Any]:
    return {
        "status": result.status.value, "reason": result.reason, "exit_code": result.exit_code,
        "attempts": result.attempts, "duration_s": result.duration_s, "cache_key": result.cache_key,
        "cached_from": result.cached_from, "outputs_path": result.outputs_path, "metrics": result.metrics,
    }


def status_json(report: StatusReport) -> dict[str, Any]:
    """Stable keys, documented in README: pipeline, run (or null), stages, next_run."""
    run: RunInfo | None = report.run
    return {
        "pipeline": report.pipeline.display_name,
        "run": run.to_json() if run else None,
        "stages": {
            s.stage: {"status": _status(s), "reason": s.reason, "exit_code": s.exit_code, "duration_s": s.duration_s,
                      "outputs_path": s.outputs_path, "cached_from": s.cached_from}
            for s in (run.stages if run else ())
        },
        "next_run": {d.stage: decision_json(d) for d in report.next_run},
        "disk": disk_json(report.disk) if report.disk is not None else None,
    }


def print_status(report: StatusReport) -> None:
    console = _out()
    run: RunInfo | None = report.run
    if run is None:
        console.print(Text(f"{report.pipeline.display_name}: no runs yet"))
    else:
        print_stages(run.stages, run_title(run))
    console.print(Text("next run:", style="bold"))
    _print_lines([Text(f"  {d.stage}: ").append(Text(decision_word(d), style="yellow" if d.run else "cyan"))
                  .append(f": {', '.join(d.reasons)}") for d in report.next_run])
    if report.disk is not None:
        console.print(describe_disk(report.disk), highlight=False)


def manifest_json(manifest: Manifest) -> dict[str, Any]:
    return {"key": manifest.key, "stage": manifest.stage, "run_id": manifest.run_id, "digest": manifest.digest,
            "files": len(manifest.files), "size": manifest.total_size, "created_at": iso_utc(manifest.created_at)}


def print_cache(manifests: list[Any], disk: Any = None) -> None:
    table = _table("key", "stage", "run", "files", "size", "created")
    for m in manifests:
        table.add_row(m.key[:12], m.stage, m.run_id, str(len(m.files)), format_bytes(m.total_size), _local_time(m.created_at))
    _out().print(table)
    if disk is not None:
        _out().print(describe_disk(disk), highlight=False)


def disk_json(disk: DiskUse) -> dict[str, int]:
    """prune.DiskUse: blocks on disk, each inode once (a run folder's hard links into the cache count there)."""
    return {"cache_bytes": disk.cache_bytes, "runs_bytes": disk.runs_bytes, "run_folders": disk.run_folders,
            "total_bytes": disk.total_bytes}


def describe_disk(disk: DiskUse) -> str:
    return (f"disk: cache {format_bytes(disk.cache_bytes)}, {disk.run_folders} run folder(s) "
            f"{format_bytes(disk.runs_bytes)} more (hard links into the cache counted once), "
            f"{format_bytes(disk.total_bytes)} in all")


def gc_json(report: GcReport, dry_run: bool) -> dict[str, Any]:
    """`pipe cache gc --json` (a cache.GcReport); stable keys, documented in README."""
    return {"dry_run": dry_run, "entries_removed": report.entries_removed, "entries_kept": report.entries_kept,
            "blobs_removed": report.blobs_removed, "blob_bytes": report.blob_bytes,
            "bytes_freed": report.bytes_freed, "bytes_still_linked": report.bytes_still_linked,
            "removed_keys": list(report.removed_keys)}


def describe_gc(report: GcReport, dry_run: bool) -> str:
    verb, freed = ("would remove", "would free") if dry_run else ("removed", "freed")
    linked = (f" ({format_bytes(report.bytes_still_linked)} of them stay linked from run folders: `pipe gc` "
              "prunes those)") if report.bytes_still_linked else ""
    return (f"{verb} {report.entries_removed} entr{'y' if report.entries_removed == 1 else 'ies'} and "
            f"{report.blobs_removed} blob(s) of {format_bytes(report.blob_bytes)}{linked}; "
            f"{freed} {format_bytes(report.bytes_freed)} on disk; kept {report.entries_kept}")


def run_gc_json(result: GcResult) -> dict[str, Any]:
    """`pipe gc --json` (an api.GcResult); stable keys, documented in README."""
    return {"dry_run": result.dry_run, "runs_removed": list(result.runs_removed),
            "runs_kept": list(result.runs_kept),
            "runs_held": [{"run_id": run_id, "reason": why} for run_id, why in result.runs_held],
            "cache": gc_json(result.cache, result.dry_run),
            "bytes_freed": result.bytes_freed, "images_removed": list(result.images_removed),
            "images_held": list(result.images_held), "image_bytes_freed": result.image_bytes_freed,
            "warnings": list(result.warnings)}


def print_run_gc(result: GcResult) -> None:
    verb, freed = ("would remove", "would free") if result.dry_run else ("removed", "freed")
    out = _out()
    for warning in result.warnings:
        warn(warning)
    out.print(f"{verb} {len(result.runs_removed)} run folder(s){': ' if result.runs_removed else ''}"
              f"{', '.join(result.runs_removed)}; kept {len(result.runs_kept)} run(s)", highlight=False)
    for run_id, why in result.runs_held:
        out.print(f"kept run {run_id}, which the keep rules would remove: {why}", highlight=False)
    out.print(describe_gc(result.cache, result.dry_run), highlight=False)
    out.print(f"{verb} {len(result.images_removed)} image(s) pipe built "
              f"({format_bytes(result.image_bytes_freed)} not shared with other images)"
              + (f"; {len(result.images_held)} kept: a container uses them" if result.images_held else ""),
              highlight=False)
    out.print(f"{freed} {format_bytes(result.bytes_freed + result.image_bytes_freed)} in all", highlight=False)


def verify_json(report: VerifyReport) -> dict[str, Any]:
    """`pipe cache verify --json` (a cache.VerifyReport); stable keys, documented in README."""
    return {"ok": not report.problems or report.repaired, "repaired": report.repaired,
            "blobs_checked": report.blobs_checked, "bytes_checked": report.bytes_checked,
            "entries_checked": report.entries_checked, "blobs_removed": report.blobs_removed,
            "entries_removed": report.entries_removed, "blobs_resealed": report.blobs_resealed,
            "problems": [{"kind": p.kind, "message": p.message, "key": p.key, "blob": p.blob}
                         for p in report.problems]}


def print_verify(report: VerifyReport) -> None:
    for problem in report.problems:
        warn(problem.message)
    repaired = (f"; repaired: {report.blobs_removed} blob(s) and {report.entries_removed} entr"
                f"{'y' if report.entries_removed == 1 else 'ies'} removed, {report.blobs_resealed} blob(s) "
                "sealed again") if report.repaired and report.problems else ""
    _out().print(f"{len(report.problems)} problem(s) in {report.blobs_checked} blob(s) of "
                 f"{format_bytes(report.bytes_checked)} and {report.entries_checked} entr"
                 f"{'y' if report.entries_checked == 1 else 'ies'}{repaired}", highlight=False)


def describe_pruned(run_id: str, at: datetime) -> str:
    return f"run {run_id}: outputs pruned by gc on {at.astimezone():%Y-%m-%d %H:%M}"


def pruned_json(at: datetime | None) -> str | None:
    """`pipe show --json`'s outputs_pruned_at: when gc removed the run's folder, or null."""
    return iso_utc(at)


def print_serve(report: Any) -> None:
    """`pipe serve ...` and `pipe promote`: one line, the replicas, and the history when asked."""
    out = _out()
    head = f"{report.pipeline}: {report.message}"
    if report.run_id:
        head += f"; run {report.run_id}, model {str(report.digest or '')[:12]}"
    if report.since:
        head += f", since {report.since}"
    if report.up:
        head += f", at http://{report.publish}"
    out.print(Text(head))
    if report.replicas:
        table = _table("replica", "run", "status", "restarts", "healthy", "requests")
        for r in report.replicas:
            table.add_row(Text(r["name"]), Text(r["run_id"]), Text(r["status"]), str(r["restarts"]),
                          "" if "healthy" not in r else ("yes" if r["healthy"] else "no"),
                          "" if r.get("requests") is None else str(r["requests"]))
        out.print(table)
    if report.history:
        table = _table("at", "event", "run", "digest", "ok", "detail")
        for e in report.history:
            table.add_row(_local_time(e.at), Text(e.event), Text(e.run_id or ""), Text((e.digest or "")[:12]),
                          "yes" if e.ok else "no", Text(e.detail))
        out.print(table)
    for problem in report.problems:
        warn(problem)


# ---- compare, metrics table, sparklines (issue 19) ---------------------------------------------------------------

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One character a value, scaled between the smallest and the largest ("▁▄█")."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(SPARKS[int((v - low) / span * (len(SPARKS) - 1) + 0.5) if span else len(SPARKS) // 2]
                   for v in values)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _change(delta: float | None, relative: float | None) -> Text:
    if delta is None:
        return Text("")
    text = f"{delta:+.4g}" + (f" ({relative:+.1%})" if relative is not None else "")
    return Text(text, style="green" if delta > 0 else "red" if delta < 0 else "dim")


def print_compare(comparison: Any) -> None:
    from orchestrator.compare import show_value

    a, b = comparison.a, comparison.b
    console = _out()
    console.print(Text(f"A  {run_title(a)}", style="bold"))
    console.print(Text(f"B  {run_title(b)}", style="bold"))
    if comparison.params:
        table = _table("param", "A", "B")
        for c in comparison.params:
            table.add_row(Text(c.name), Text(show_value(c.a)), Text(show_value(c.b)))
        console.print(table)
    else:
        console.print(Text("params: the same"))
    if comparison.metrics:
        table = _table("metric", "A", "B", "change")
        for m in comparison.metrics:
            table.add_row(Text(m.name), _num(m.a), _num(m.b), _change(m.delta, m.relative))
        console.print(table)
    table = _table("stage", "A", "B", "time A", "time B", "why B re-ran / what differs")
    for s in comparison.stages:
        notes = list(s.reasons) if s.reran else [r for r in s.reasons if r.startswith("not in")]
        if s.image_a != s.image_b and s.image_a and s.image_b:
            notes.append(f"image {s.image_a[:19]} -> {s.image_b[:19]}")
        notes += [f"input {c.name} {(c.a or '-')[:8]}.. -> {(c.b or '-')[:8]}.." for c in s.inputs
                  if not any(r.startswith(f"input {c.name}") for r in notes)]
        if s.outputs_differ and s.outputs_a and s.outputs_b:
            notes.append(f"outputs {s.outputs_a[:8]}.. -> {s.outputs_b[:8]}..")
        table.add_row(s.stage, Text(s.status_a or "-", style=STYLE.get(s.status_a or "", "")),
                      Text(s.status_b or "-", style=STYLE.get(s.status_b or "", "")), _dur(s.duration_a),
                      _dur(s.duration_b), Text("; ".join(notes) or ("re-ran" if s.reran else "")))
    console.print(table)


def print_metrics_table(table_data: Any) -> None:
    """`pipe metrics`: newest first, the params that vary, status (a gate failure in red), metrics."""
    params, names = table_data.varying_params, table_data.metric_names
    table = _table("run", "started", "status", *params, *names)
    for row in table_data.rows:
        run = row.run
        status = Text(str(run.status), style=STYLE.get(str(run.status), ""))
        if row.gate_failed:
            status = Text("gate failed", style="bold red")
        if row.repeats:
            status.append(f" +{len(row.repeats)} cached", style="dim")
        elif row.cached_from:
            status.append(f" (cached from {row.cached_from})", style="dim")
        table.add_row(run.id, _local_time(run.started_at), status,
                      *(Text(_param(row.params.get(p))) for p in params),
                      *(_num(row.metrics.get(n)) for n in names))
    _out().print(table)


def _param(value: Any) -> str:
    return "" if value is None else json.dumps(value, ensure_ascii=False)


def print_sparklines(data: Any) -> None:
    console = _out()
    width = max((len(s.name) for s in data.series), default=0)
    for s in data.series:
        values = [p.value for p in s.points]
        if not values:
            continue
        line = f"{s.name:<{width}}  {sparkline(values)}  {values[0]:.4g} -> {values[-1]:.4g}"
        line += f"  (min {min(values):.4g}, max {max(values):.4g}, {plural(len(values), 'run')})"
        console.print(Text(line))


# ---- the remote: push, pull, gc --remote ------------------------------------------------------------------------


def describe_pushed(event: Pushed) -> str:
    there = f"; {event.present} already there" if event.present else ""
    return (f"pushed {plural(event.entries, 'cache entry', 'cache entries')} ({plural(event.files, 'file')}, "
            f"{format_bytes(event.bytes)}) to {event.remote} in {format_duration(event.seconds)}{there}")


class TransferProgress:
    """push/pull progress on a terminal: files, bytes and rate on one line of stderr, redrawn at most 4 times a
    second; nothing off a terminal (the final report says it all). Thread-safe (transfers run in parallel)."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._on = self._stream.isatty()
        self._label, self._lock = label, threading.Lock()
        self._files = self._bytes = self._total_files = self._total_bytes = 0
        self._start, self._drawn = time.monotonic(), 0.0

    def expect(self, files: int, nbytes: int) -> None:
        with self._lock:
            self._total_files, self._total_bytes = self._total_files + files, self._total_bytes + nbytes

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._files, self._bytes = self._files + 1, self._bytes + nbytes
            if self._on and time.monotonic() - self._drawn >= 0.25:
                self._draw()

    def close(self) -> None:
        with self._lock:
            if self._on and self._drawn:
                self._draw()
                self._stream.write("\n")
                self._stream.flush()

    def _draw(self) -> None:
        now = time.monotonic()
        rate = self._bytes / max(now - self._start, 1e-6)
        self._stream.write(f"\r{self._label}: {self._files}/{self._total_files} files, {format_bytes(self._bytes)}"
                           f"/{format_bytes(self._total_bytes)}, {format_bytes(rate)}/s\x1b[K")
        self._stream.flush()
        self._drawn = now


def sync_json(report: Any) -> dict[str, Any]:
    """`pipe push --json` / `pipe pull --json` (a cachestore.SyncReport); stable keys, documented in README."""
    return {"action": report.action, "remote": report.remote, "run_id": report.run_id, "ok": report.ok,
            "error": report.error, "files": report.files, "bytes": report.bytes,
            "seconds": round(report.seconds, 3),
            "entries": [{"stage": e.stage, "key": e.key, "status": e.status, "files": e.files, "bytes": e.bytes,
                         "message": e.message} for e in report.entries]}


def print_sync(report: Any) -> None:
    out = _out()
    for e in report.entries:
        if e.status == "damaged":
            warn(f"{e.stage}: {e.message}")
        size = f" ({plural(e.files, 'file')}, {format_bytes(e.bytes)})" if e.files else ""
        why = f": {e.message}" if e.message and e.status != "damaged" else ""
        out.print(Text(f"{e.stage}: {e.status}{size}{why}"))
    done = "pushed" if report.action == "push" else "pulled"
    where = "to" if report.action == "push" else "from"
    counts = ", ".join(f"{report.count(k)} {k}" for k in ("present", "missing", "damaged", "unknown", "failed")
                       if report.count(k))
    out.print(Text(f"{done} {plural(report.count(done), 'entry', 'entries')} ({plural(report.files, 'file')}, "
                   f"{format_bytes(report.bytes)}) {where} {report.remote} in {format_duration(report.seconds)}"
                   + (f"; {counts}" if counts else "")))


def remote_gc_json(report: Any) -> dict[str, Any]:
    """`pipe cache gc --remote --json` (a remote.RemoteGcReport); stable keys, documented in README."""
    return {"dry_run": report.dry_run, "remote": report.remote, "grace_s": report.grace_s, "entries_removed": report.entries_removed,
            "entries_kept": report.entries_kept, "young_kept": report.young_kept,
            "blobs_removed": report.blobs_removed, "blob_bytes": report.blob_bytes,
            "removed_keys": list(report.removed_keys)}


def describe_remote_gc(report: Any) -> str:
    verb = "would remove" if report.dry_run else "removed"
    young = f"; {report.young_kept} object(s) younger than {format_duration(report.grace_s)} left alone" \
        if report.young_kept else ""
    return (f"{report.remote}: {verb} {plural(report.entries_removed, 'entry', 'entries')} and "
            f"{plural(report.blobs_removed, 'blob')} of {format_bytes(report.blob_bytes)}; "
            f"kept {report.entries_kept}{young}")
