"""console.py's reporters rendered in-process: a rich Console with force_terminal=True into a StringIO stands for
the terminal, a StringIO for cron and CI."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from orchestrator import console
from orchestrator.errors import ExitCode
from orchestrator.events import (
    BuildFinished,
    BuildProgress,
    BuildStarted,
    Event,
    RunFinished,
    RunStarted,
    StageFinished,
    StageOutput,
    StagePlanned,
    StageStarted,
)
from orchestrator.results import RunStatus, RunSummary, StageResult, StageStatus

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MARKUP_LINE = "loss 0.3 [[gpu]] and [bold]x[/] done"


def terminal() -> tuple[console.LiveReporter, io.StringIO]:
    out = io.StringIO()
    return console.LiveReporter(Console(file=out, force_terminal=True, width=120, color_system="standard")), out


def screen(out: io.StringIO) -> str:
    return ANSI.sub("", out.getvalue())


def failed(stage: str, reason: str = "exited with code 1") -> StageResult:
    return StageResult(stage, StageStatus.FAILED, reason=reason, exit_code=1, started_at=T0,
                       finished_at=T0 + timedelta(seconds=1.64), log_path=f"/state/run-1/{stage}.log")


def run_events(stage: str, lines: list[str], result: StageResult) -> list[Event]:
    summary = RunSummary("run-1", RunStatus.FAILED, {stage: result}, ExitCode.FAILED)
    return [RunStarted("run-1", "demo", (stage,)), StagePlanned(stage, True, ("never ran",)),
            StageStarted(stage, 1), *(StageOutput(stage, line) for line in lines), StageFinished(result),
            RunFinished(summary)]


def test_a_failed_stage_shows_the_end_of_its_output_under_one_table() -> None:
    reporter, out = terminal()
    for event in run_events("train", [f"epoch {i}" for i in range(30)] + ["Traceback: boom"], failed("train")):
        reporter.emit(event)
    text = screen(out)
    after = text[text.rindex("train failed: exited with code 1"):]
    assert "Traceback: boom" in after and "epoch 11" in after, after
    assert "epoch 10\n" not in after, "only the last 20 lines"
    assert "full log: pipe logs run-1 train" in after
    assert reporter.shows_summary, "cli must not print a second table with other headers"


def test_a_stage_that_printed_nothing_says_so() -> None:
    reporter, out = terminal()
    for event in run_events("train", [], failed("train", "killed: out of memory (cap 6.0 MiB)")):
        reporter.emit(event)
    after = screen(out).split("train failed: killed: out of memory (cap 6.0 MiB)")[-1]
    assert "(it printed nothing)" in after and "full log: pipe logs run-1 train" in after


def test_stage_text_is_never_read_as_markup() -> None:
    reporter, out = terminal()
    for event in run_events("train", [MARKUP_LINE], failed("train", f"gate: {MARKUP_LINE}")):
        reporter.emit(event)
    text = screen(out)
    assert text.count(MARKUP_LINE) >= 2, text  # the output line, and the reason under the table
    assert "[]" not in text.replace(MARKUP_LINE, "")


def test_history_tables_do_not_read_reasons_as_markup(capsys: object) -> None:
    summary = RunSummary("run-1", RunStatus.FAILED, {"train": failed("train", MARKUP_LINE)}, ExitCode.FAILED)
    console.print_summary(summary)
    assert MARKUP_LINE in capsys.readouterr().out  # type: ignore[attr-defined]


def test_plain_mode_names_the_command_for_a_failed_stages_log() -> None:
    out = io.StringIO()
    reporter = console.PlainReporter(out)
    for event in run_events("train", [MARKUP_LINE], failed("train")):
        reporter.emit(event)
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert f"train | {MARKUP_LINE}" in lines
    assert "train: failed: exited with code 1 in 1.64s" in lines
    assert "train: full log: pipe logs run-1 train" in lines
    assert not reporter.shows_summary


def test_a_build_is_one_live_line_and_its_log_only_when_it_fails(tmp_path: Path) -> None:
    reporter, out = terminal()
    reporter.emit(BuildStarted("data", "stages/data"))
    for i in range(1, 4):
        reporter.emit(BuildProgress("data", i, 6, f"Step {i}/6 : RUN apt-get install thing-{i}"))
    reporter.emit(BuildProgress("data", 3, 6, "Get:1 http://deb [[gpu]] thing"))
    frame = reporter._render()  # what the live line shows now
    live = Console(file=io.StringIO(), width=120)
    live.print(frame)
    assert re.fullmatch(r"building data: step 3/6, \d+ s\n", live.file.getvalue())  # type: ignore[attr-defined]
    reporter.emit(BuildFinished("data", True, 34.0))
    log = tmp_path / "builds" / "model-20260101T000000Z.log"
    log.parent.mkdir()
    log.write_text("Step 1/2 : FROM base\nStep 2/2 : RUN make [bold]x[/]\nmake: *** no rule\n")
    reporter.emit(BuildStarted("model", "stages/model"))
    reporter.emit(BuildFinished("model", False, 2.0, str(log), "build of stages/model failed: exit 2"))
    text = screen(out)
    assert "thing-1" not in text, "a build that succeeds shows no raw output"
    assert "data: image built in 34.0s" in text
    assert "RUN make [bold]x[/]" in text and "make: *** no rule" in text
    assert f"full log: {log}" in text


def test_plain_mode_reports_a_build_in_two_lines() -> None:
    out = io.StringIO()
    reporter = console.PlainReporter(out)
    reporter.emit(BuildStarted("data", "stages/data"))
    for i in range(50):
        reporter.emit(BuildProgress("data", 1, 2, f"apt line {i}"))
    reporter.emit(BuildFinished("data", False, 3.0, "/state/builds/data-x.log", "build failed"))
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["data: building image from stages/data",
                     "data: image build failed after 3.00s; full log: /state/builds/data-x.log"]
