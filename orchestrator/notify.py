"""Notifications of `notify:`: a webhook gets one JSON POST per event, a command the JSON on its stdin.

Best effort by design: a receiver that is down, slow or failing is retried a bounded number of times, each try
under the target's timeout, and then given up, with one line in the returned problems. Nothing here raises,
so no run or promotion fails or stalls because of a notification. Payloads carry what pipe records (event,
pipeline, run, digest, detail), never a secret value: the caller passes `redact` (the run's secret values).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from orchestrator.spec import Notify

BACKOFF_S = 0.5  # doubled after each failed try


def payload(event: str, pipeline: str, run_id: str | None = None, digest: str | None = None,
            detail: str = "", **extra: Any) -> dict[str, Any]:
    return {"event": event, "pipeline": pipeline, "run_id": run_id, "digest": digest, "detail": detail,
            "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"), **extra}


def send(targets: Sequence[Notify], body: dict[str, Any], redact: Iterable[str] = ()) -> list[str]:
    """Deliver `body` to every target subscribed to its event; the problems, one line each (empty: all sent)."""
    text = json.dumps(body, sort_keys=True)
    for secret in redact:
        if secret:
            text = text.replace(secret, "***")
    problems = []
    for target in targets:
        if body["event"] not in target.events:
            continue
        problem = _deliver(target, text.encode())
        if problem:
            problems.append(problem)
    return problems


def _deliver(target: Notify, data: bytes) -> str | None:
    last = ""
    for attempt in range(target.retries + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        last = _post(target, data) if target.webhook is not None else _run(target, data)
        if not last:
            return None
    where = target.webhook or " ".join(_argv(target))
    return f"notify {where}: {last} (after {target.retries + 1} tries)"


def _post(target: Notify, data: bytes) -> str:
    assert target.webhook is not None
    request = urllib.request.Request(target.webhook, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "pipe"})
    try:
        with urllib.request.urlopen(request, timeout=target.timeout) as response:
            response.read(65536)
            return "" if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        return str(reason) or type(e).__name__


def _argv(target: Notify) -> list[str]:
    command = target.command
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command or ())


def _run(target: Notify, data: bytes) -> str:
    try:
        done = subprocess.run(_argv(target), input=data, capture_output=True, timeout=target.timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {target.timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)
    return "" if done.returncode == 0 else f"exited with code {done.returncode}"
