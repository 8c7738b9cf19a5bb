"""Drive `pipe` as a subprocess and ask the engine what it really did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.executor import LABEL_PIPELINE


def pipe(*args: str | Path, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    """Run `pipe ARGS` to its end (not on a terminal: plain lines)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


def start_pipe(*args: str | Path, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *map(str, args)], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def pipe_json(*args: str | Path) -> Any:
    done = pipe(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def containers_created(client: Any, owner: Path, since: float) -> int:
    """How many containers the engine created for this pipeline's state dir since `since` (engine events)."""
    events = client.events(
        since=int(since) - 1, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create", "label": f"{LABEL_PIPELINE}={owner}"},
    )
    return sum(1 for e in events if e.get("timeNano", 0) >= since * 1e9)  # `since` has whole-second resolution
