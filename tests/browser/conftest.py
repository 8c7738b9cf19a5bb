"""Headless Chromium (Debian's `chromium` and `chromium-driver`, installed by scripts/setup.sh), driven by
Selenium. Skipped only where the browser is missing outside CI; under PIPE_REQUIRE_DOCKER (CI) that fails.
Screenshots go to test-output/screenshots/ (kept by CI as artifacts)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_DOCKER

CHROMIUM = os.environ.get("PIPE_TEST_CHROMIUM", "/usr/bin/chromium")
DRIVER = os.environ.get("PIPE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(os.environ.get("PIPE_TEST_OUTPUT", Path(__file__).resolve().parents[2] / "test-output")) \
    / "screenshots"


def _missing(why: str) -> None:
    if REQUIRE_DOCKER:  # CI: the browser suite must run
        pytest.fail(f"headless Chromium required but {why}: run scripts/setup.sh (apt-get install chromium "
                    "chromium-driver)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (the test extra)")
    for path in (CHROMIUM, DRIVER):
        if not (os.access(path, os.X_OK) or shutil.which(path)):
            _missing(f"{path} is missing")
    profile = tempfile.mkdtemp(prefix="pipe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=1280,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)  # no Selenium Manager
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def screenshot(browser: Any, request: pytest.FixtureRequest) -> Any:
    def take(name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{request.node.name}-{name}.png"
        browser.save_screenshot(str(path))
        return path

    return take
