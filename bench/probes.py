"""What the bench measures with: `pipe` as a timed subprocess (with the bytes it read), the bare Docker SDK floor,
and the engine's own count of the containers a command started. Knows nothing of the rows or the table."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUSYBOX = "pipe-busybox:latest"
LABEL_MANAGED = "dev.pipe.managed"  # the same names as orchestrator.executor; the bench labels what it starts
LABEL_PIPELINE = "dev.pipe.pipeline"

# `python -m orchestrator ARGS`, writing the process's rchar (/proc/self/io: bytes returned by read(2), page cache
# included) to BENCH_IO_FILE at exit, however it exits, so a no-op run shows it read no input content.
_LAUNCHER = """
import atexit, os, runpy, sys
def _report():
    with open('/proc/self/io') as f:
        rchar = next(line.split()[1] for line in f if line.startswith('rchar:'))
    with open(os.environ['BENCH_IO_FILE'], 'w') as f:
        f.write(rchar)
atexit.register(_report)
_exit = os._exit  # pipe leaves through os._exit (no interpreter teardown), which runs no atexit hook
def _exit_reporting(code):
    _report()
    _exit(code)
os._exit = _exit_reporting
sys.argv[0] = 'pipe'
runpy.run_module('orchestrator', run_name='__main__', alter_sys=True)
"""


class BenchError(Exception):
    """A measurement could not be taken: the command failed or its result is not what the row needs."""


@dataclass(frozen=True)
class Timed:
    seconds: float
    read_bytes: int  # what the process read(2), Python's own modules included
    stdout: str


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def repeat(times: int, measure: Callable[[], float]) -> list[float]:
    """`measure()` `times` times (at least once); each call returns the seconds of its timed part only."""
    return [measure() for _ in range(max(1, times))]


def alternate(times: int, *measures: Callable[[], float]) -> list[float]:
    """The median of each measure over `times` rounds, taken in turns (a, b, a, b, ...): a change in the machine's
    load during the bench then moves a figure and its reference alike."""
    samples: list[list[float]] = [[] for _ in measures]
    for _ in range(max(1, times)):
        for taken, measure in zip(samples, measures, strict=True):
            taken.append(measure())
    return [median(taken) for taken in samples]


def run_pipe(*args: str | Path, cwd: Path | None = None, expect: int | None = 0,
             env: Mapping[str, str] | None = None) -> Timed:
    """Run `pipe ARGS` as a user would (a fresh interpreter, not on a terminal) and time it end to end."""
    with tempfile.NamedTemporaryFile(prefix="bench-io-", delete=False) as f:
        io_file = f.name
    try:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, *map(str, args)], check=False, cwd=cwd, capture_output=True, text=True,
            env={**os.environ, **(env or {}), "BENCH_IO_FILE": io_file}, timeout=1800,
        )
        seconds = time.perf_counter() - started
        read_bytes = int(Path(io_file).read_text() or 0)
    finally:
        os.unlink(io_file)
    if expect is not None and done.returncode != expect:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise BenchError(f"pipe {' '.join(map(str, args))} exited {done.returncode}: {last[0]}")
    return Timed(seconds, read_bytes, done.stdout)


def run_command(argv: Sequence[str | Path], cwd: Path | None = None, env: Mapping[str, str] | None = None
                ) -> float:
    """Run a command to its end, raising BenchError on a non-zero exit; return its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], check=False, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise BenchError(f"{' '.join(map(str, argv))} exited {done.returncode}: {last[0]}")
    return seconds


def labels_for(owner: Path) -> dict[str, str]:
    """The labels of a container the bench starts itself, so leftover checks and the final sweep find it."""
    return {LABEL_MANAGED: "1", LABEL_PIPELINE: str(owner)}


def floor_once(client: Any, owner: Path, **host: Any) -> float:
    """One trivial container created, started, waited for and removed through the Docker SDK: the floor.

    Without a network, like a pipe stage by default: the cheapest container the engine makes (no veth pair)."""
    started = time.perf_counter()
    container = client.containers.create(BUSYBOX, ["true"], **{
        "labels": labels_for(owner), "network_mode": "none", **host})
    try:
        container.start()
        container.wait()
    finally:
        container.remove(force=True)
    return time.perf_counter() - started


def sdk_threads(client: Any, owner: Path, containers: int, threads: int) -> float:
    """`containers` floors from `threads` threads; the wall seconds of the whole batch."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda _: floor_once(client, owner), range(containers)))
    return time.perf_counter() - started


def containers_started(client: Any, owner: Path, since: float) -> int:
    """How many containers labelled for `owner` the engine started since `since` (a time.time()), from its events.

    `since` is whole seconds for the engine, so events are filtered again by timeNano."""
    events = client.events(
        since=int(since) - 1, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "start", "label": f"{LABEL_PIPELINE}={owner}"},
    )
    return sum(1 for e in events if e.get("timeNano", 0) >= since * 1e9)


def remove_leftovers(client: Any, under: Path) -> list[str]:
    """Remove every bench or pipe container whose pipeline label is under `under`; return their names."""
    found = [c for c in client.containers.list(all=True, filters={"label": LABEL_MANAGED})
             if c.labels.get(LABEL_PIPELINE, "").startswith(str(under))]
    for container in found:
        container.remove(force=True)
    return [c.name for c in found]


def sdk_dag(client: Any, owner: Path, needs: Mapping[str, Sequence[str]], threads: int) -> float:
    """One floor per stage of a DAG, each started once its needs are done, at most `threads` at a time: the
    no-network SDK floor of a run at the same parallelism. The wall seconds of the whole DAG."""
    from concurrent.futures import FIRST_COMPLETED, Future, wait

    started = time.perf_counter()
    done: set[str] = set()
    running: dict[Future[float], str] = {}
    waiting = list(needs)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        while waiting or running:
            for name in [n for n in waiting if all(up in done for up in needs[n])][:threads - len(running)]:
                waiting.remove(name)
                running[pool.submit(floor_once, client, owner)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()
                done.add(running.pop(future))
    return time.perf_counter() - started
