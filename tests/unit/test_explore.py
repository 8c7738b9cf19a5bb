"""compare, the metrics table, plots and the report, on real history made in-process (tests/history.py)."""

from __future__ import annotations

import json
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orchestrator import api, explore
from orchestrator.errors import NotFound, UsageError
from tests.history import Made, make_history, run


@pytest.fixture
def made(make_pipeline: Callable[..., Path]) -> Made:
    return make_history(make_pipeline)


def target(made: Made) -> api.Target:
    return api.Target(made.path)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_references_latest_back_and_promoted(made: Made) -> None:
    with explore.history(target(made)) as h:
        assert explore.resolve_run(h, "latest").id == made.broken
        assert explore.resolve_run(h, "latest~1").id == made.gate_failed
        assert explore.resolve_run(h, "latest~4").id == made.first
        # promoted, with nothing served yet: the latest succeeded run whose gate passed
        assert explore.resolve_run(h, "promoted").id == made.better
        with pytest.raises(NotFound, match="latest~9: pipeline project has 5 runs"):
            explore.resolve_run(h, "latest~9")


def test_compare_names_params_metrics_and_why_stages_reran(made: Made) -> None:
    comparison = explore.compare_runs(target(made), made.first, made.better)
    assert {c.name: (c.a, c.b) for c in comparison.params} == {
        "evaluate.quality": (0.8, 0.9), "train.n_estimators": (100, 300)}
    r2 = next(m for m in comparison.metrics if m.name == "evaluate.r2")
    assert (r2.a, r2.b) == (0.8, 0.9) and r2.delta == pytest.approx(0.1) and r2.relative == pytest.approx(0.125)
    stages = {s.stage: s for s in comparison.stages}
    assert not stages["data"].reran and stages["data"].status_b == "cached"
    assert stages["train"].reran and stages["train"].reasons == ("param n_estimators 100 -> 300",)
    assert stages["evaluate"].reasons == ("param quality 0.8 -> 0.9", "upstream train outputs changed")
    assert stages["train"].outputs_differ and not stages["data"].outputs_differ
    as_json = comparison.to_json()
    assert as_json["a"]["id"] == made.first and as_json["b"]["id"] == made.better
    assert json.loads(json.dumps(as_json)) == as_json


def test_compare_of_an_edited_input_shows_its_digests(made: Made) -> None:
    (made.path.parent / "raw.csv").write_text("a,b\n9,9\n")
    edited = run(made.path)
    stages = {s.stage: s for s in explore.compare_runs(target(made), made.first, edited).stages}
    assert stages["data"].reran and stages["data"].reasons[0].startswith("input raw.csv changed")
    assert [c.name for c in stages["data"].inputs] == ["raw.csv"]


def test_metrics_newest_first_with_params_status_and_repeats_folded(made: Made) -> None:
    table = explore.metrics_table(target(made))
    assert [r.run.id for r in table.rows] == [made.broken, made.gate_failed, made.better, made.first]
    first = table.rows[-1]
    assert first.repeats == (made.repeat,) and first.metrics == {"evaluate.r2": 0.8, "evaluate.rmse": 0.2}
    assert table.rows[1].gate_failed and table.rows[1].gate_failed.startswith("gate: r2 0.3 below the minimum")
    assert table.rows[0].gate_failed is None and str(table.rows[0].run.status) == "failed"
    assert table.varying_params == ["evaluate.quality", "train.n_estimators"]
    everything = explore.metrics_table(target(made), all_runs=True)
    assert [r.run.id for r in everything.rows][3:] == [made.repeat, made.first]
    assert everything.rows[3].cached_from == made.first


def test_metrics_limit_metric_sort_and_since(made: Made) -> None:
    best = explore.metrics_table(target(made), metrics=["r2"], sort=True)
    assert best.metric_names == ["evaluate.r2"]
    assert [r.metrics.get("evaluate.r2") for r in best.rows] == [0.9, 0.8, 0.3, None]
    worst = explore.metrics_table(target(made), metrics=["r2"], sort=True, ascending=True)
    assert [r.metrics.get("evaluate.r2") for r in worst.rows][:3] == [0.3, 0.8, 0.9]
    assert [r.run.id for r in explore.metrics_table(target(made), limit=2).rows] == [made.broken, made.gate_failed]
    assert explore.metrics_table(target(made), since="2999-01-01").rows == []
    assert len(explore.metrics_table(target(made), since="1h").rows) == 4
    with pytest.raises(UsageError, match="no metric 'f1'"):
        explore.metrics_table(target(made), metrics=["f1"])
    with pytest.raises(UsageError, match="--since 'soon'"):
        explore.metrics_table(target(made), since="soon")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_plot_png_has_a_real_image(made: Made, tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    data = explore.plot(target(made), ["r2"], out)
    assert png_size(out) == (800, 360)
    assert [p.value for p in data.series[0].points] == [0.8, 0.8, 0.9, 0.3]
    assert [p.number for p in data.series[0].points] == [1, 2, 3, 4]  # the broken run 5 recorded no metric
    assert data.series[0].gates == [("gate min 0.5", 0.5)] and data.promoted == made.better


def test_plot_svg_has_one_point_per_run_a_gate_line_and_the_promoted_run(made: Made, tmp_path: Path) -> None:
    out = tmp_path / "plot.svg"
    explore.plot(target(made), [], out, x="time")
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("width") == "576pt"
    groups = {g.get("id"): g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("id")}
    for name in ("evaluate.r2", "evaluate.rmse"):
        assert len(list(groups[f"series-{name}"].iter("{http://www.w3.org/2000/svg}use"))) == 4
    assert "gate-evaluate.r2" in groups and "gate-evaluate.rmse" not in groups
    assert "promoted-evaluate.r2" in groups


def test_plot_refuses_other_formats(made: Made, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="png or a .svg"):
        explore.plot(target(made), [], tmp_path / "plot.gif")


def test_sparkline() -> None:
    from orchestrator.console import sparkline

    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([2.0, 2.0]) == "▅▅" and sparkline([]) == ""


class Page(HTMLParser):
    """What a test asks of an HTML page: ids, nodes of the DAG, <pre> texts, every URL-bearing attribute."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: dict[str, dict[str, str | None]] = {}
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append(tag)
        if found.get("id"):
            self.ids[str(found["id"])] = found
        self.urls += [str(v) for k, v in attrs if k in ("src", "href", "xlink:href", "action", "data") and v]
        self._in_pre = tag == "pre"

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pre.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._in_pre = False


def test_report_is_one_file_with_the_dag_log_tails_metrics_and_no_url(made: Made, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    before = snapshot(made.path.parent / "runs")
    page = explore.write_report(target(made), "latest", out)
    assert snapshot(made.path.parent / "runs") == before, "pipe report writes nothing into the state"
    html = out.read_text()
    parsed = Page(html)
    nodes = {k.removeprefix("node-"): v for k, v in parsed.ids.items() if k.startswith("node-")}
    assert {k: v["data-status"] for k, v in nodes.items()} == {
        "data": "cached", "train": "failed", "evaluate": "skipped"}
    assert any("train exit 1" in text for text in parsed.pre)  # the failed stage's log tail
    assert "exited with code 1" in html and "512 MiB memory" in html
    assert [u for u in parsed.urls if not u.startswith("#")] == [], "the report must reference nothing outside"
    assert "http://" not in html and "https://" not in html and "script" not in parsed.tags
    assert page.run.id == made.broken


def test_report_of_the_promoted_run_shows_metrics_params_artifacts_and_chart(made: Made, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    explore.write_report(target(made), "promoted", out)
    parsed = Page(out.read_text())
    assert "trend" in parsed.ids and "series-evaluate.r2" in parsed.ids
    text = out.read_text()
    assert "promoted" in text and "evaluate.r2" in text and "train.n_estimators" in text and "model.bin" in text


def test_read_commands_create_nothing(make_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    path = make_pipeline({"stages": {"a": {"image": "x", "command": "true"}}})
    assert explore.metrics_table(api.Target(path)).rows == []
    assert explore.plot_series(api.Target(path)).series == []
    with pytest.raises(NotFound, match="latest~1: pipeline project has 0 runs"):
        explore.compare_runs(api.Target(path), "latest~1", "latest")
    with pytest.raises(NotFound, match="no metrics in history"):
        explore.plot(api.Target(path), [], tmp_path / "plot.png")
    assert not (path.parent / "runs").exists() and not (tmp_path / "plot.png").exists()



def test_promoted_is_the_served_run_once_serving_recorded_one(made: Made) -> None:
    with api.open_store(api.load(target(made))) as store:
        store.record_serve_event("project", "promoted", made.first, "digest-1")  # e.g. `pipe serve rollback`
    with explore.history(target(made)) as h:
        assert explore.resolve_run(h, "promoted").id == made.first
