"""The benchmark script runs end to end at tiny sizes (`bench/run.py --quick`); no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ROWS = (
    "floor: 1 container via the SDK",
    "the same with pipe's sandbox",
    "start-up: `pipe --help`",
    "import floor",
    "chain of 2 trivial stages",
    "per-stage overhead",
    "wide DAG: 2 independent trivial stages",
    "parallel: 2 stages computing 1 s each",
    "3 stages: no-op rerun, all cached",
    "input 2 MiB in 20 files: no-op rerun, all cached",
    "input 2 MiB in 20 files: rerun after touching every file",
    "cold hashing of the input",
    "planning 50 stages: `pipe validate --no-images`",
    "planning 50 stages: load_pipeline + build_plan in-process",
    "`pipe status`, 20 runs in history",
    "plan10, never run: `pipe status`",
    "plan50, never run: `pipe run --dry-run`",
    "ml4 cold, `--jobs 2`, nothing cached",
    "wide10 cold, `--jobs 2`, nothing cached",
)


def test_quick_bench_prints_every_row(docker: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"  # under tmp_path: the docker fixture fails the test on a container left behind
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--work", str(work)], cwd=REPO, capture_output=True,
        text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    for row in ROWS:
        assert any(line.startswith(f"| {row}") for line in table), f"row {row!r} missing from:\n{done.stdout}"
    assert "FAILED" not in done.stdout
    assert "wrote" not in done.stderr  # --quick leaves bench/RESULTS.md alone
    assert (work / "input" / "data").is_dir()


SERVE_ROWS = ("direct: the replica at its internal address", "proxy (bridge)", "proxy (published)",
              "no swap, keep-alive clients", "during a swap, keep-alive clients",
              "no swap, `Connection: close` clients", "during a swap, `Connection: close` clients")


def test_quick_serve_bench_prints_every_row(docker: Any, tmp_path: Path) -> None:
    """bench/serve_bench.py --quick: wrk through pipe's proxy and to the replica directly, and across a swap."""
    done = subprocess.run(
        [sys.executable, "bench/serve_bench.py", "--quick", "--work", str(tmp_path / "work")], cwd=REPO,
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    for row in SERVE_ROWS:
        assert any(line.startswith(f"| {row}") for line in table), f"row {row!r} missing from:\n{done.stdout}"
    assert "FAILED" not in done.stdout + done.stderr
    assert "wrote" not in done.stderr  # --quick leaves bench/SERVE_RESULTS.md alone
