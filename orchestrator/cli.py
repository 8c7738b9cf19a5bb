"""The `pipe` command: parse arguments, call api, render with console. main() alone turns a PipeError into one
line on stderr and its exit code."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from orchestrator import api, console
from orchestrator.errors import ExitCode, NotFound, PipeError, UsageError
from orchestrator.events import BuildFinished, BuildStarted, RunStarted
from orchestrator.plan import Selection

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Run machine-learning pipelines as a DAG of Docker containers, cached by content.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and prune the stage cache.")
app.add_typer(cache_app, name="cache")


PipelineArg = Annotated[Path, typer.Argument(help="The pipeline file.", show_default=True)]
StateDirOpt = Annotated[
    Path | None, typer.Option("--state-dir", envvar="PIPE_STATE_DIR", help="State folder (default: runs/ beside the file).")
]
DbOpt = Annotated[str | None, typer.Option("--db", envvar="PIPE_DB", help="SQLAlchemy URL of the history database.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DEFAULT_FILE = Path("pipeline.yaml")


def _target(pipeline: Path, state_dir: Path | None, db: str | None) -> api.Target:
    return api.Target(pipeline, state_dir, db)


@app.command()
def run(
    pipeline: PipelineArg = DEFAULT_FILE,
    stage: Annotated[str | None, typer.Option("--stage", help="Run only this stage.")] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Run this stage and everything downstream.")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Stages at once (default: CPUs).")] = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", "-k", help="Run what does not depend on a failure.")] = False,
    force: Annotated[list[str] | None, typer.Option("--force-stage", help="Ignore the cache for this stage.")] = None,
    force_all: Annotated[bool, typer.Option("--force", help="Ignore the cache for every stage.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Predict hits and misses; start nothing.")] = False,
    no_gate: Annotated[bool, typer.Option("--no-gate", help="Do not check the gates this once (recorded).")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for a running run of this pipeline.")] = False,
    timeout: Annotated[str | None, typer.Option("--timeout", help="Cancel the run after this long (e.g. 2h).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Override a param: STAGE.KEY=VALUE.")] = None,
    trigger: Annotated[str, typer.Option("--trigger", help="Recorded in history: manual or schedule.")] = "manual",
    plain: Annotated[bool, typer.Option("--plain", help="Plain log lines even on a terminal.")] = False,
    executor: Annotated[str | None, typer.Option("--executor", help="local, swarm or kubernetes (default: the file's executor.kind).")] = None,
    kube_context: Annotated[str | None, typer.Option("--kube-context", help="The kubeconfig context (kubernetes executor; default: executor.context, else the current one).")] = None,
    fetch: Annotated[str, typer.Option("--fetch", help="swarm: whose outputs come to this host: none, final (the stages nothing in the run needs) or all; the rest stay in the remote (`pipe pull RUN`).")] = "final",
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the pipeline; stages whose cache key is known are restored, not re-run."""
    from orchestrator.units import parse_duration

    try:
        timeout_s = parse_duration(timeout) if timeout else None
    except ValueError as e:
        raise UsageError(f"--timeout: {e}") from e
    request = api.RunRequest(
        target=_target(pipeline, state_dir, db),
        selection=Selection(stage=stage, from_stage=from_stage),
        jobs=jobs, keep_going=keep_going, force=True if force_all else frozenset(force or ()),
        gate=not no_gate, wait=wait, timeout_s=timeout_s, params=tuple(param or ()), trigger=api.parse_trigger(trigger) or "manual",
        executor=api.parse_executor(executor), kube_context=kube_context, fetch=api.parse_fetch(fetch),
    )
    if dry_run:
        forecast = api.dry_run(request)
        if json_out:
            console.print_json(console.forecast_json(forecast))
        else:
            console.print_forecast(forecast.decisions)
        raise typer.Exit(0)
    # with --json, stdout carries the summary alone: progress lines go to stderr
    reporter = console.make_reporter(sys.stderr if json_out else None, live=False if (plain or json_out) else None)
    cancel = api.Cancel()
    phase = _Phase(reporter)
    restore = _install_signal_handlers(cancel, phase)
    try:
        summary = api.run_pipeline(request, phase, cancel)
    except Interrupted as e:  # typer would turn a KeyboardInterrupt into exit 130, also for SIGTERM
        console.error("interrupted before any stage started" if not phase.started else "interrupted")
        raise typer.Exit(int(e.exit_code)) from None
    finally:
        restore()
    if json_out:
        console.print_json({"run_id": summary.run_id, "status": summary.status, "exit_code": int(summary.exit_code),
                            "stages": {n: console.result_json(r) for n, r in summary.results.items()}})
    elif not reporter.shows_summary:  # the live view's last frame is the summary: print it once
        console.print_summary(summary)
    raise typer.Exit(int(summary.exit_code))


class Interrupted(KeyboardInterrupt):
    """Raised by the signal handler where stopping at once is clean; `run` exits with `exit_code`."""

    def __init__(self, exit_code: ExitCode) -> None:
        super().__init__()
        self.exit_code = exit_code


class _Phase:
    """Passes events on to the console, noting what the signal handler needs: whether an image build runs, and
    whether the run's stages have started (before that no container runs: Ctrl-C stops at once)."""

    def __init__(self, reporter: Any) -> None:
        self.reporter, self.building, self.started = reporter, 0, False

    def emit(self, event: Any) -> None:
        if isinstance(event, BuildStarted):
            self.building += 1
        elif isinstance(event, BuildFinished):
            self.building -= 1
        elif isinstance(event, RunStarted):
            self.started = True
        self.reporter.emit(event)


def _install_signal_handlers(cancel: api.Cancel, phase: _Phase) -> Any:
    """SIGINT/SIGTERM during an image build, or before any stage starts: stop now (the build's container is
    removed on the way out). Once stages run, the first cancels cleanly (containers stopped with a grace
    period, outputs discarded, the run recorded cancelled); the second stops waiting: the process's containers
    are killed, so the run ends within about a second; a third raises at once."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    count = 0

    def handle(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        code = ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED
        if phase.building or not phase.started or count > 2:
            cancel.set(code)
            raise Interrupted(code)
        if count == 1:
            console.warn("cancelling: stopping running stages (again to kill them)")
            cancel.set(code)
            return
        console.warn("killing running stages")
        threading.Thread(target=_kill_containers, name="pipe-kill", daemon=True).start()

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


gate_app = typer.Typer(no_args_is_help=True, help="Quality gates: accept a new baseline.")
app.add_typer(gate_app, name="gate")


@gate_app.command("accept")
def gate_accept(
    run: Annotated[str, typer.Argument(help="The run whose metrics become the baseline (or `latest`).")],
    pipeline: PipelineArg = DEFAULT_FILE,
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage's gate.")] = None,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Accept RUN as the baseline that max_drop gates measure from (recorded in history)."""
    accepted = api.gate_accept(_target(pipeline, state_dir, db), run, stage)
    if json_out:
        console.print_json([{"stage": a.stage, "metric": a.metric, "value": a.value, "run_id": a.run_id}
                            for a in accepted])
    for a in accepted if not json_out else ():
        typer.echo(f"{a.stage}: gate baseline is now run {a.run_id} ({a.metric} = {a.value:g})")


serve_app = typer.Typer(no_args_is_help=True, help="Serve the model that passed the gate, behind pipe's proxy.")
app.add_typer(serve_app, name="serve")
DockerOpt = Annotated[str | None, typer.Option("--docker", envvar="DOCKER_HOST", help="Docker engine URL.")]


def _print_serve(report: Any, json_out: bool) -> None:
    if json_out:
        console.print_json(report.to_json())
    else:
        console.print_serve(report)


@serve_app.command("up")
def serve_up(pipeline: PipelineArg = DEFAULT_FILE,
             run: Annotated[str | None, typer.Option("--run", help="Serve this run (default: the one served last, "
                                                     "else the latest whose gate passed).")] = None,
             state_dir: StateDirOpt = None, db: DbOpt = None, docker: DockerOpt = None, json_out: JsonOpt = False) -> None:
    """Start serving and return once the model answers its health check."""
    from orchestrator import serve_api

    _print_serve(serve_api.up(_target(pipeline, state_dir, db), run, docker), json_out)


@serve_app.command("status")
def serve_status(pipeline: PipelineArg = DEFAULT_FILE,
                 history: Annotated[bool, typer.Option("--history", help="Every recorded serving event.")] = False,
                 state_dir: StateDirOpt = None, db: DbOpt = None, docker: DockerOpt = None,
                 json_out: JsonOpt = False) -> None:
    """What is served: run, model digest, since when, health, replicas (found by label); writes nothing."""
    from orchestrator import serve_api

    _print_serve(serve_api.status(_target(pipeline, state_dir, db), history, docker), json_out)


@serve_app.command("check")
def serve_check(pipeline: PipelineArg = DEFAULT_FILE, state_dir: StateDirOpt = None, db: DbOpt = None,
                docker: DockerOpt = None, json_out: JsonOpt = False) -> None:
    """Record a health change or a crash restart since the last check, and notify serve_unhealthy (for cron)."""
    from orchestrator import serve_api

    report = serve_api.check(_target(pipeline, state_dir, db), docker)
    _print_serve(report, json_out)
    raise typer.Exit(0 if report.up else 1)


@serve_app.command("logs")
def serve_logs(pipeline: PipelineArg = DEFAULT_FILE,
               follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow the output.")] = False,
               state_dir: StateDirOpt = None, db: DbOpt = None, docker: DockerOpt = None) -> None:
    """The served replicas' output."""
    from orchestrator import serve_api

    for chunk in serve_api.logs(_target(pipeline, state_dir, db), follow, docker):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


@serve_app.command("down")
def serve_down(pipeline: PipelineArg = DEFAULT_FILE, state_dir: StateDirOpt = None, db: DbOpt = None,
               docker: DockerOpt = None, json_out: JsonOpt = False) -> None:
    """Stop serving: remove the proxy, the replicas and the network (also what a killed pipe left)."""
    from orchestrator import serve_api

    _print_serve(serve_api.down(_target(pipeline, state_dir, db), docker), json_out)


@serve_app.command("rollback")
def serve_rollback(pipeline: PipelineArg = DEFAULT_FILE, state_dir: StateDirOpt = None, db: DbOpt = None,
                   docker: DockerOpt = None, json_out: JsonOpt = False) -> None:
    """Serve the run served before the current one again (without downtime)."""
    from orchestrator import serve_api

    _print_serve(serve_api.rollback(_target(pipeline, state_dir, db), docker), json_out)


@app.command()
def promote(run: Annotated[str, typer.Argument(help="The run whose model to serve (or `latest`).")],
            pipeline: PipelineArg = DEFAULT_FILE, state_dir: StateDirOpt = None, db: DbOpt = None,
            docker: DockerOpt = None, json_out: JsonOpt = False) -> None:
    """Serve RUN's model: started beside the old one, switched to once healthy, the old one drained."""
    from orchestrator import serve_api

    _print_serve(serve_api.promote(_target(pipeline, state_dir, db), run, docker), json_out)


@app.callback(invoke_without_command=True)
def _version(
    version: Annotated[bool, typer.Option("--version", help="Print pipe's version and exit.", is_eager=True)] = False,
) -> None:
    if version:
        from orchestrator import __version__

        typer.echo(f"pipe {__version__}")
        raise typer.Exit(0)


@app.command()
def validate(
    pipeline: PipelineArg = DEFAULT_FILE,
    no_images: Annotated[bool, typer.Option("--no-images", help="Skip the engine: images and GPUs.")] = False,
    state_dir: StateDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the pipeline file (and that its images exist or build) without running anything."""
    target = _target(pipeline, state_dir, None)
    if not json_out:
        # builds are reported on stderr (a live line per image on a terminal), so stdout keeps the verdict alone
        spec = api.validate(target, check_images=not no_images, reporter=console.make_reporter(sys.stderr))
        typer.echo(f"{pipeline}: ok ({console.plural(len(spec.stages), 'stage')})")
        return
    report = api.validate_all(target, check_images=not no_images)
    console.print_json(console.validation_json(report))
    raise typer.Exit(max((int(e.exit_code) for e in report.errors), default=0))


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline.yaml, for editors."""
    console.print_json(api.schema())


@app.command()
def status(pipeline: PipelineArg = DEFAULT_FILE, state_dir: StateDirOpt = None, db: DbOpt = None,
           json_out: JsonOpt = False) -> None:
    """The latest run, one line a stage, and what would run next time and why."""
    report = api.status(_target(pipeline, state_dir, db))
    if json_out:
        console.print_json(console.status_json(report))
    else:
        console.print_status(report)


@app.command("runs")
def runs(
    pipeline: PipelineArg = DEFAULT_FILE,
    status_filter: Annotated[str | None, typer.Option("--status", help="Only runs with this status.")] = None,
    trigger: Annotated[str | None, typer.Option("--trigger", help="manual or schedule.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 20,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Recent runs, newest first."""
    found = api.list_runs(_target(pipeline, state_dir, db), status_filter, trigger, limit)
    if json_out:
        console.print_json([r.to_json() for r in found])
    else:
        console.print_runs(found)


app.command("history", help="Recent runs, newest first (alias of runs).")(runs)


@app.command()
def show(run_id: Annotated[str, typer.Argument(help="Run id, a prefix of one, or 'latest'.")],
         pipeline: PipelineArg = DEFAULT_FILE, state_dir: StateDirOpt = None, db: DbOpt = None,
         json_out: JsonOpt = False) -> None:
    """One run in full: stages, artifacts and metrics."""
    info = api.show_run(_target(pipeline, state_dir, db), run_id)
    pruned = api.pruned_at(_target(pipeline, state_dir, db), info.id)
    if json_out:
        console.print_json({**info.to_json(), "outputs_pruned_at": console.pruned_json(pruned)})
    else:
        console.print_run(info)
        if pruned is not None:
            typer.echo(console.describe_pruned(info.id, pruned))


@app.command()
def logs(
    run_id: Annotated[str, typer.Argument(help="Run id, a prefix of one, or 'latest'.")],
    stage: Annotated[str, typer.Argument()],
    pipeline: PipelineArg = DEFAULT_FILE,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow a running stage.")] = False,
    origin: Annotated[bool, typer.Option("--origin", help="A cached stage: the log of the run it came from.")]
    = False,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
) -> None:
    """Print a stage's stored log."""
    target = _target(pipeline, state_dir, db)
    log = api.log_path(target, run_id, stage, origin=origin)
    if log.origin:
        console.note(f"stage {stage} of run {log.run.id} was restored from run {log.origin}; its log:")
    if follow:
        lines: Any = api.follow_log(target, log)
    else:
        try:
            lines = [log.path.read_bytes()]
        except FileNotFoundError:
            raise NotFound(f"stage {stage} of run {log.origin or log.run.id} has no log file at {log.path}") from None
    printed = False
    for line in lines:
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        printed = printed or bool(line)
    if not printed:
        console.note(console.empty_log_note(log.stage, log.origin or log.run.id))


@app.command()
def dag(pipeline: PipelineArg = DEFAULT_FILE,
        fmt: Annotated[str, typer.Option("--format", help="text, mermaid or dot.")] = "text",
        json_out: JsonOpt = False) -> None:
    """Draw the stage graph (--json: its nodes and edges)."""
    if json_out:
        console.print_json(console.dag_json(api.dag_plan(_target(pipeline, None, None))))
    else:
        typer.echo(api.dag(_target(pipeline, None, None), fmt))


@app.command()
def metrics(
    pipeline: PipelineArg = DEFAULT_FILE,
    diff: Annotated[bool, typer.Option("--diff", help="Show the change from the previous run.")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 20,
    since: Annotated[str | None, typer.Option("--since", help="Runs since 7d, 12h or a date.")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="Also the runs whose metrics were cached repeats.")]
    = False,
    metric: Annotated[list[str] | None, typer.Option("--metric", "-m", help="Only this metric (r2 = *.r2).")] = None,
    sort: Annotated[bool, typer.Option("--sort", help="Best first by the first --metric (largest).")] = False,
    ascending: Annotated[bool, typer.Option("--ascending", help="With --sort: smallest first.")] = False,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Metrics across runs, newest first, with their params and status; cached repeats folded in."""
    from orchestrator import explore

    if diff:  # the change from the run before, oldest first as before
        found = api.metric_history(_target(pipeline, state_dir, db), limit)
        if json_out:
            console.print_json([{"run_id": run_id, "metrics": values}
                                for run_id, values in console.metrics_by_run(found).items()])
        else:
            console.print_metrics(found, diff)
        return
    table = explore.metrics_table(_target(pipeline, state_dir, db), since=since, limit=limit, all_runs=all_runs,
                                  metrics=metric or (), sort=sort, ascending=ascending)
    if json_out:
        console.print_json(table.to_json())
    else:
        console.print_metrics_table(table)


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="A run id, prefix, latest, latest~N or promoted.")],
    run_b: Annotated[str, typer.Argument(help="The run to compare it with (same forms).")] = "latest",
    pipeline: PipelineArg = DEFAULT_FILE,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Two runs side by side: params and metrics that differ, stages that re-ran and why, digests, durations."""
    from orchestrator import explore

    comparison = explore.compare_runs(_target(pipeline, state_dir, db), run_a, run_b)
    if json_out:
        console.print_json(comparison.to_json())
    else:
        console.print_compare(comparison)


@app.command()
def plot(
    names: Annotated[list[str] | None, typer.Argument(help="Metrics (default: all); r2 matches evaluate.r2.",
                                                      show_default=False)] = None,
    pipeline: Annotated[Path, typer.Option("--pipeline", "-f", help="The pipeline file.")] = DEFAULT_FILE,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write a chart: plot.png or plot.svg.")]
    = None,
    x: Annotated[str, typer.Option("--x", help="run (number) or time.")] = "run",
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="The latest N runs with metrics.")] = 200,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Metrics across runs: a sparkline each in the terminal, and with -o a chart with gates and promoted runs."""
    from orchestrator import explore

    if x not in ("run", "time"):
        raise UsageError(f"--x must be run or time, not {x!r}")
    target = _target(pipeline, state_dir, db)
    if output is not None:
        data = explore.plot(target, names or (), output, x=x, limit=limit)
    else:
        data = explore.plot_series(target, names or (), limit=limit)
    if json_out:
        console.print_json({**data.to_json(), "output": str(output) if output else None})
        return
    console.print_sparklines(data)
    if output is not None:
        console.note(f"wrote {output}")


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="Run id, prefix, latest, latest~N or promoted.")] = "latest",
    pipeline: PipelineArg = DEFAULT_FILE,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
) -> None:
    """One self-contained HTML page of a run: DAG by status, reasons, durations, resources, artifacts, metrics
    with their trend, params and log tails. Opens without any network."""
    from orchestrator import explore

    page = explore.write_report(_target(pipeline, state_dir, db), run_id, output)
    typer.echo(f"wrote {output} (run {page.run.id})")


@app.command()
def ui(
    pipeline: PipelineArg = DEFAULT_FILE,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: any free port.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Loopback by default; any other needs a token.")]
    = "127.0.0.1",
    token: Annotated[str | None, typer.Option("--token", envvar="PIPE_UI_TOKEN", help="Required on every request "
                                                                                      "(generated off loopback).")]
    = None,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
) -> None:
    """A read-only web UI of the history: runs, a run's DAG and logs, metrics charts, compare, schedules."""
    from orchestrator import webui

    server = webui.make_server(_target(pipeline, state_dir, db), host, port, token)
    typer.echo(f"pipe ui: {server.url}", nl=True)
    if server.generated_token:
        typer.echo(f"token (required on every request): {server.token}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cache_app.command("ls")
def cache_ls(pipeline: PipelineArg = DEFAULT_FILE, state_dir: StateDirOpt = None, json_out: JsonOpt = False) -> None:
    """List cache entries, newest first, and what the cache and the run folders hold on disk."""
    target = _target(pipeline, state_dir, None)
    entries = api.cache_entries(target)
    if json_out:
        console.print_json([console.manifest_json(m) for m in entries])
    else:
        console.print_cache(entries, api.cache_disk_use(target))


@cache_app.command("verify")
def cache_verify(
    pipeline: PipelineArg = DEFAULT_FILE,
    repair: Annotated[bool, typer.Option("--repair", help="Remove corrupt blobs and the entries that need them.")]
    = False,
    state_dir: StateDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash every blob; report damaged entries (a damaged entry is a miss: the stage re-runs). Exits 1 when
    problems remain (found without --repair)."""
    report = api.cache_verify(_target(pipeline, state_dir, None), repair=repair)
    if json_out:
        console.print_json(console.verify_json(report))
    else:
        console.print_verify(report)
    raise typer.Exit(1 if report.problems and not report.repaired else 0)


KeepRunsOpt = Annotated[int | None, typer.Option("--keep-runs", min=0, help="Keep what the last N runs use.")]
KeepDaysOpt = Annotated[float | None, typer.Option("--keep-days", min=0, help="Keep what the last D days use.")]
GcDryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be removed; remove nothing.")]


@cache_app.command("gc")
def cache_gc(
    pipeline: PipelineArg = DEFAULT_FILE,
    keep_runs: KeepRunsOpt = None,
    keep_days: KeepDaysOpt = None,
    dry_run: GcDryRunOpt = False,
    remote: Annotated[bool, typer.Option("--remote", help="Collect the `remote:` store instead.")] = False,
    grace: Annotated[str, typer.Option("--grace", help="--remote: leave objects younger than this.")] = "1d",
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove cache entries that no kept run references (run folders stay: `pipe gc` prunes them too)."""
    if remote:
        from orchestrator import sharing
        from orchestrator.units import parse_duration

        try:  # 0 is allowed here (no grace: nothing may be pushing), unlike a timeout
            grace_s = 0.0 if grace.strip() in ("0", "0s") else parse_duration(grace)
        except ValueError as e:
            raise UsageError(f"--grace: {e}") from e
        found = sharing.remote_gc(_target(pipeline, state_dir, db), keep_runs, keep_days, dry_run, grace_s)
        if json_out:
            console.print_json(console.remote_gc_json(found))
        else:
            typer.echo(console.describe_remote_gc(found))
        return
    report = api.cache_gc(_target(pipeline, state_dir, db), keep_runs, keep_days, dry_run)
    if json_out:
        console.print_json(console.gc_json(report, dry_run))
    else:
        typer.echo(console.describe_gc(report, dry_run))


@app.command("gc")
def gc(
    pipeline: PipelineArg = DEFAULT_FILE,
    keep_runs: KeepRunsOpt = None,
    keep_days: KeepDaysOpt = None,
    dry_run: GcDryRunOpt = False,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove old runs' folders, the cache entries and the pipe-built images no kept run uses; never the latest
    successful run nor a running one. Reports what the disk gets back."""
    result = api.gc(_target(pipeline, state_dir, db), keep_runs, keep_days, dry_run)
    if json_out:
        console.print_json(console.run_gc_json(result))
    else:
        console.print_run_gc(result)


RunAndFileArg = Annotated[list[str] | None, typer.Argument(help="[RUN] [pipeline.yaml]", show_default=False)]


def _run_and_file(words: list[str] | None) -> tuple[str | None, Path]:
    """`[RUN] [FILE]`: a word ending in .yaml or .yml is the pipeline file, another the run."""
    run_id, path = None, DEFAULT_FILE
    for word in words or ():
        if word.endswith((".yaml", ".yml")):
            path = Path(word)
        elif run_id is None:
            run_id = word
        else:
            raise UsageError(f"expected [RUN] [pipeline.yaml], got {' '.join(words or ())}")
    return run_id, path


@app.command()
def push(
    words: RunAndFileArg = None,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload the cache entries of RUN (default: latest) to the pipeline's `remote:` (blobs, then manifests)."""
    from orchestrator import sharing

    run_id, path = _run_and_file(words)
    progress = console.TransferProgress("push")
    try:
        report = sharing.push_run(_target(path, state_dir, db), run_id or "latest", progress)
    finally:
        progress.close()
    _sync_done(report, json_out)


@app.command()
def pull(
    words: RunAndFileArg = None,
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage's entry.")] = None,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download remote cache entries: those of RUN's stages, or (no RUN) those the next run would look up."""
    from orchestrator import sharing

    run_id, path = _run_and_file(words)
    progress = console.TransferProgress("pull")
    try:
        report = sharing.pull(_target(path, state_dir, db), run_id, stage, progress=progress)
    finally:
        progress.close()
    _sync_done(report, json_out)


def _sync_done(report: Any, json_out: bool) -> None:
    """Print a push or pull; a transfer the remote stopped exits 4 after its report (one line on stderr)."""
    if json_out:
        console.print_json(console.sync_json(report))
    else:
        console.print_sync(report)
    if report.error is not None:
        console.error(report.error)
        raise typer.Exit(int(ExitCode.INFRA))


@app.command()
def schedule(
    words: Annotated[list[str] | None, typer.Argument(help="[install|uninstall] [pipeline.yaml]", show_default=False)]
    = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many fire times to list.")] = 5,
    apply: Annotated[bool, typer.Option("--apply", help="install: write the user's crontab (else print).")] = False,
    force: Annotated[bool, typer.Option("--force", help="install --apply: even when cron's time zone is not the "
                                                        "schedule's.")] = False,
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the next fire times of the pipeline's `schedule:` and what became of its latest ticks; `install`
    prints (or --apply installs) its crontab line, `uninstall` removes it."""
    action, rest = "list", list(words or ())
    if rest and rest[0] in ("list", "install", "uninstall"):
        action = rest.pop(0)
    if len(rest) > 1:
        raise UsageError(f"pipe schedule takes one pipeline file, got {len(rest)}")
    target = _target(Path(rest[0] if rest else DEFAULT_FILE).resolve(), state_dir, db)
    if action == "install":
        entry = api.install_schedule(target, apply=apply, force=force)
        if entry.warning:
            console.warn(entry.warning)
        typer.echo(f"installed into the crontab: {entry.marker}" if apply else entry.text, nl=apply)
    elif action == "uninstall":
        typer.echo(f"removed {console.plural(api.uninstall_schedule(target), 'crontab line')}")
    else:
        report = api.schedule_report(target, count)
        if json_out:
            console.print_json(console.schedule_json(report))
        else:
            console.print_schedule(report)


@app.command()
def scheduler(
    pipelines: Annotated[list[Path] | None, typer.Argument(help="Pipeline files (default: ./pipeline.yaml).")] = None,
    on_stop: Annotated[str, typer.Option("--on-stop", help="On SIGTERM/SIGINT: finish or cancel the running run.")]
    = "finish",
    state_dir: StateDirOpt = None,
    db: DbOpt = None,
) -> None:
    """Run the built-in scheduler in the foreground (for a systemd unit or a container)."""
    import logging
    import threading

    if on_stop not in ("finish", "cancel"):
        raise UsageError(f"--on-stop must be finish or cancel, not {on_stop!r}")
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO, stream=sys.stdout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    paths = [p.resolve() for p in (pipelines or [DEFAULT_FILE])]
    api.run_scheduler(paths, _target(paths[0], state_dir, db), console.make_reporter(live=False), stop,
                      "finish" if on_stop == "finish" else "cancel")


def main() -> NoReturn:
    """Console script entry point: `pipe`. Ends the process with its exit code (see _leave)."""
    try:
        app()
    except PipeError as e:
        console.error(str(e))
        if os.environ.get("PIPE_DEBUG"):
            raise
        _leave(int(e.exit_code))
    except KeyboardInterrupt:  # a second Ctrl-C: the interpreter's exit still joins the threads removing containers
        console.error("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))
    except SystemExit as e:  # typer's way of returning, also for --help and usage errors
        if isinstance(e.code, str):
            console.error(e.code)
        _leave(1 if isinstance(e.code, str) else int(e.code or 0))
    _leave(0)


def _kill_containers() -> None:
    from orchestrator import docker_executor  # loaded already: a run is under way

    try:
        docker_executor.kill_process_containers(os.getpid())
    except PipeError as e:
        console.error(str(e))


def _leave(code: int) -> NoReturn:
    """Flush and exit without the interpreter's teardown, which took 0.16 s (a third of a no-op run) freeing
    modules and objects that the process's end frees anyway. Only for a command that returned or raised: each
    closes the store in its context manager and joins its threads (containers removed) before it does."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)
