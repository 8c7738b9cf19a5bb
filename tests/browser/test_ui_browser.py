"""`pipe ui` and `pipe report` in a real headless Chromium, against real history (tests/history.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import api as pipe_api
from orchestrator import explore, webui
from tests.conftest import wait_for
from tests.history import Made, make_history, run
from tests.ui_server import serve


@pytest.fixture
def made(make_pipeline: Callable[..., Path]) -> Made:
    return make_history(make_pipeline)


@pytest.fixture
def server(made: Made) -> Iterator[webui.UIServer]:
    with serve(made.path) as running:
        yield running


def by_css(browser: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, selector))


def run_rows(browser: Any) -> dict[str, str]:
    """Run id -> status of the rows shown, in one script call (the table is re-rendered while it polls)."""
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#runs tbody tr')].map(r => [r.dataset.runId, r.dataset.status])")
    return dict(rows)


def first_row(browser: Any) -> str | None:
    return browser.execute_script("const r = document.querySelector('#runs tbody tr'); return r && r.dataset.runId")


def console_errors(browser: Any) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_runs_table_lists_every_run_and_filters_and_sorts(browser: Any, server: webui.UIServer, made: Made,
                                                          screenshot: Any) -> None:
    browser.get(server.url)
    rows = wait_for(lambda: run_rows(browser) if len(run_rows(browser)) == 5 else None, 30, "5 runs listed")
    assert rows == {made.first: "succeeded", made.repeat: "succeeded", made.better: "succeeded",
                    made.gate_failed: "failed", made.broken: "failed"}
    assert first_row(browser) == made.broken
    headers = browser.execute_script("return [...document.querySelectorAll('#runs thead th')].map(h => h.textContent)")
    assert "train.n_estimators" in headers and "evaluate.r2" in headers
    from selenium.webdriver.support.ui import Select

    Select(by_css(browser, "#status-filter")[0]).select_by_value("failed")
    wait_for(lambda: set(run_rows(browser)) == {made.gate_failed, made.broken}, 10, "only failed runs")
    Select(by_css(browser, "#status-filter")[0]).select_by_value("")
    by_css(browser, "#filter")[0].send_keys("n_estimators=300")
    wait_for(lambda: set(run_rows(browser)) == {made.better}, 10, "the filtered run")
    by_css(browser, "#filter")[0].clear()
    by_css(browser, "#filter")[0].send_keys(" ")
    browser.execute_script("document.querySelector('#runs thead th[data-key=\"m:evaluate.r2\"]').click()")
    wait_for(lambda: first_row(browser) == made.better, 10, "sorted by r2")
    screenshot("runs")
    assert console_errors(browser) == []


def test_a_failed_stage_page_shows_its_log_tail_and_follows_its_log(browser: Any, server: webui.UIServer,
                                                                    made: Made, screenshot: Any) -> None:
    browser.get(f"{server.url}runs/{made.broken}")
    nodes = {n.get_attribute("data-stage"): n.get_attribute("data-status") for n in by_css(browser, ".dag .node")}
    assert nodes == {"data": "cached", "train": "failed", "evaluate": "skipped"}
    tail = by_css(browser, "#log-train pre")[0]
    assert tail.is_displayed() and "train exit 1" in tail.text
    assert "exited with code 1" in by_css(browser, "#stage-train")[0].text
    by_css(browser, "#node-train")[0].click()
    wait_for(lambda: "train exit 1" in by_css(browser, "#log-view")[0].text, 10, "the followed log")
    links = [a.get_attribute("href") for a in by_css(browser, "#artifacts a")]
    assert any(link.endswith(f"/runs/{made.broken}/artifacts/data/out.txt") for link in links)
    shot = screenshot("run-page")
    assert shot.stat().st_size > 10_000
    assert console_errors(browser) == []


def test_metrics_chart_has_one_point_per_run_with_the_gate(browser: Any, server: webui.UIServer, made: Made) -> None:
    browser.get(f"{server.url}metrics")
    points = by_css(browser, '[id="series-evaluate.r2"] use')
    assert len(points) == 4  # first, repeat, better, gate_failed; the broken run recorded no r2
    assert by_css(browser, '[id="gate-evaluate.r2"]') and by_css(browser, '[id="promoted-evaluate.r2"]')
    table = by_css(browser, "#metrics-table")[0].text
    assert "gate failed" in table and "+1 cached" in table


def test_compare_shows_the_changed_param(browser: Any, server: webui.UIServer, made: Made, screenshot: Any) -> None:
    browser.get(f"{server.url}compare?a={made.first}&b={made.better}")
    params = by_css(browser, "#compare-params")[0].text
    assert "train.n_estimators" in params and "300" in params and "evaluate.quality" in params
    assert "param n_estimators 100 -> 300" in by_css(browser, "#compare-stages")[0].text
    from selenium.webdriver.support.ui import Select

    Select(by_css(browser, "#pick-a")[0]).select_by_value(made.gate_failed)
    by_css(browser, "form button")[0].click()
    wait_for(lambda: f"a={made.gate_failed}" in browser.current_url, 10, "the chosen run")
    assert "0.3" in by_css(browser, "#compare-params")[0].text
    screenshot("compare")


def test_a_live_run_updates_without_a_reload(browser: Any, server: webui.UIServer, made: Made) -> None:
    release, started = threading.Event(), threading.Event()

    def slow(spec: Any, outputs: Path) -> int:
        started.set()
        release.wait(60)
        (outputs / "model.bin").write_bytes(b"slow model")
        return 0

    browser.get(server.url)
    wait_for(lambda: len(run_rows(browser)) == 5, 30, "5 runs listed")
    browser.execute_script("window.__sameDocument = true")
    worker = threading.Thread(target=run, args=(made.path, "train.n_estimators=11"),
                              kwargs={"behaviours": {"train": slow}}, daemon=True)
    worker.start()
    try:
        assert started.wait(30)
        live = wait_for(lambda: [i for i, s in run_rows(browser).items() if s == "running"], 30, "a running row")
        run_id = live[0]
        browser.get(f"{server.url}runs/{run_id}")
        wait_for(lambda: by_css(browser, "#node-train")[0].get_attribute("data-status") == "running", 10,
                 "train running")
        browser.execute_script("window.__sameDocument = true")
    finally:
        release.set()
        worker.join(60)
    wait_for(lambda: by_css(browser, "#node-train")[0].get_attribute("data-status") == "succeeded", 20,
             "train succeeded in place")
    assert by_css(browser, "#node-evaluate")[0].get_attribute("data-status") == "succeeded"
    assert browser.execute_script("return window.__sameDocument") is True, "the page must not reload"
    assert "succeeded" in by_css(browser, "#run-status .badge")[0].text


def test_the_token_is_enforced_in_the_browser(browser: Any, made: Made) -> None:
    with serve(made.path, host="0.0.0.0") as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        browser.delete_all_cookies()
        browser.get(url)
        assert "needs its token" in browser.find_element("tag name", "body").text
        browser.get(f"{url}?token={server.token}")
        wait_for(lambda: len(run_rows(browser)) == 5, 30, "runs listed with the token's cookie")
        browser.get(f"{url}runs/{made.broken}")
        assert by_css(browser, "#node-train")
        browser.delete_all_cookies()
        browser.get(f"{url}runs/{made.broken}")
        assert "needs its token" in browser.find_element("tag name", "body").text


def test_the_report_renders_offline_without_errors_or_requests(browser: Any, made: Made, tmp_path: Path,
                                                                screenshot: Any) -> None:
    out = tmp_path / "report.html"
    explore.write_report(pipe_api.Target(made.path), made.better, out)
    browser.get("about:blank")
    browser.get_log("performance")  # drop what came before
    browser.get_log("browser")
    browser.get(out.as_uri())
    requested = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requested if m["method"] == "Network.requestWillBeSent"}
    assert urls <= {out.as_uri()}, f"the report fetched {urls - {out.as_uri()}}"
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert {n.get_attribute("data-stage") for n in by_css(browser, ".dag .node")} == {"data", "train", "evaluate"}
    assert by_css(browser, '[id="series-evaluate.r2"]')
    assert console_errors(browser) == []
    screenshot("report")
