"""The `pipe` benchmark: orchestration overhead against the bare Docker floor, no-op reruns, hashing, planning,
history queries, and DVC side by side. One command; prints a table of medians with a ratio against a floor or a
peer measured in the same run, and (full mode) writes bench/RESULTS.md. See bench/README.md."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import workloads as wl
from dvc_peer import SCENARIOS, compare, compare_noop, install_dvc
from probes import (
    BUSYBOX,
    BenchError,
    Timed,
    alternate,
    containers_started,
    floor_once,
    median,
    remove_leftovers,
    repeat,
    run_command,
    run_pipe,
    sdk_dag,
    sdk_threads,
)

from orchestrator.hashing import hash_tree

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MiB, GiB = 1024**2, 1024**3
BUSY_NOTE = ("The machine was busy (a load average above its {cpus} CPUs): absolute figures are inflated by other "
             "work; the ratios, each taken in turns with its reference, are the comparable part.")
HASH_WORKERS = inspect.signature(hash_tree).parameters["workers"].default  # what `pipe run` uses


@dataclass(frozen=True)
class Sizes:
    repeat: int  # repetitions of the quick measurements (the median is reported)
    heavy: int  # repetitions of the measurements that start 20 containers or more
    floors: int
    chain: int
    wide: int
    busy_s: int  # seconds each of the two parallel stages computes
    fan: int
    input_bytes: int
    input_files: int
    dag: int
    history: int
    peers: bool  # DVC and the example pipeline: minutes, so not in --quick


FULL = Sizes(repeat=5, heavy=3, floors=15, chain=20, wide=100, busy_s=10, fan=100, input_bytes=GiB,
             input_files=10_000, dag=5_000, history=10_000, peers=True)
QUICK = Sizes(repeat=1, heavy=1, floors=2, chain=2, wide=2, busy_s=1, fan=2, input_bytes=2 * MiB, input_files=20,
              dag=50, history=20, peers=False)


@dataclass(frozen=True)
class Row:
    """One line of the table. `value` and `reference` are seconds (shown in `unit`) or GB/s."""

    measure: str
    value: float | None
    unit: str = "s"  # "s", "ms" or "GB/s"
    against: str = ""  # what the ratio is taken against
    reference: float | None = None
    goal: float | None = None  # in seconds (or GB/s); met when value < goal
    note: str = ""
    ratio_goal: float | None = None  # met when value / reference <= ratio_goal (issue 20's "at most 0.75x DVC")

    def cells(self, judge: bool) -> list[str]:
        ratio = f"{self.value / self.reference:.2f}x" if self.value is not None and self.reference else ""
        goals, met = [], []
        if self.goal is not None:
            goals.append(f"< {_show(self.goal, self.unit)}")
            met.append(self.value is not None and self.value < self.goal)
        if self.ratio_goal is not None:
            goals.append(f"<= {self.ratio_goal:.2f}x")
            met.append(self.value is not None and bool(self.reference)
                       and self.value / (self.reference or 1) <= self.ratio_goal)
        goal = ", ".join(goals)
        verdict = ""
        if judge and goals and self.value is not None:
            verdict = "met" if all(met) else "MISSED"
        ref = f"{self.against} {_show(self.reference, self.unit)}".strip() if self.against else ""
        return [self.measure, _show(self.value, self.unit), ref, ratio, goal, verdict, self.note]


def _show(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.0f} ms"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


@dataclass
class Bench:
    client: Any
    work: Path
    sizes: Sizes

    def pipeline(self, name: str, stages: dict[str, dict[str, Any]]) -> Path:
        return wl.write_pipeline(self.work / name, stages)

    def floor(self) -> float:
        return floor_once(self.client, self.work / "sdk")


def seconds(*args: str | Path, keep: list[Timed] | None = None) -> Callable[[], float]:
    """A measure: `pipe ARGS` as a subprocess, its Timed appended to `keep`."""

    def measure() -> float:
        timed = run_pipe(*args)
        if keep is not None:
            keep.append(timed)
        return timed.seconds

    return measure


STARTUP = seconds("--help")  # what every command pays before it works; taken in turns with each figure
# The libraries `pipe status` and a no-op `pipe run` load on a SQLite history (tests/e2e/test_import_budget.py),
# with the entry point's GC and exit (orchestrator/__main__.py) but no pipe code: neither can start faster than this
LIBRARIES = ("import gc; gc.disable(); import pydantic, typer, rich.console, yaml, sqlite3; "
             "import os; os._exit(0)")
HEADER = ["measure", "pipe", "against", "ratio", "goal", "", "note"]


def floors(b: Bench) -> list[Row]:
    from orchestrator.docker_executor import host_kwargs
    from orchestrator.executor import ContainerSpec, Mount

    scratch = b.work / "sdk-mounts"
    scratch.mkdir(parents=True, exist_ok=True)
    spec = ContainerSpec(name="floor", image_id=BUSYBOX, command=("true",), labels={},
                         mounts=(Mount(scratch, "/outputs", read_only=False),), memory_bytes=4 * GiB, pids=1024,
                         user=f"{os.getuid()}:{os.getgid()}")
    sandbox = {k: v for k, v in host_kwargs(spec).items() if k not in ("command", "labels")}
    b.floor()  # the first container after a while pays for cold engine caches
    floor, sandboxed = alternate(b.sizes.floors, b.floor,
                                 lambda: floor_once(b.client, b.work / "sdk", **sandbox))
    python, libraries, startup = alternate(b.sizes.repeat, lambda: run_command([sys.executable, "-c", "pass"]),
                                           lambda: run_command([sys.executable, "-c", LIBRARIES]), STARTUP)
    return [
        Row("floor: 1 container via the SDK (create, start, wait, remove; no network)", floor),
        Row("the same with pipe's sandbox (init, no caps, read-only, tmpfs, no network, limits)", sandboxed,
            against="floor", reference=floor),
        Row("start-up: `pipe --help`", startup, against="`python3 -c pass`", reference=python),
        Row("import floor: the libraries that `pipe status` and a no-op `pipe run` load", libraries,
            against="`python3 -c pass`", reference=python, note="pydantic, typer, rich, yaml, sqlite3"),
    ]


def chain(b: Bench) -> list[Row]:
    n = b.sizes.chain
    long, one, floors_n = alternate(
        b.sizes.heavy, seconds("run", b.pipeline("chain", wl.chain(n))),
        seconds("run", b.pipeline("chain1", wl.chain(1))), lambda: sum(b.floor() for _ in range(n)))
    floor = floors_n / n
    return [
        Row(f"chain of {n} trivial stages, cache off, `pipe run`", long, against=f"{n} floors",
            reference=floors_n),
        Row(f"per-stage overhead: (chain - {n} floors) / {n}", (long - floors_n) / n, "ms", "floor", floor,
            goal=0.030),
        Row(f"marginal per-stage overhead: (chain{n} - chain1) / {n - 1} - floor", (long - one) / (n - 1) - floor,
            "ms", "floor", floor, note="start-up excluded"),
    ]


def wide(b: Bench) -> list[Row]:
    n = b.sizes.wide
    pipe_s, sdk_s = alternate(b.sizes.heavy, seconds("run", "--jobs", "2", b.pipeline("wide", wl.wide(n))),
                              lambda: sdk_threads(b.client, b.work / "sdk", n, 2))
    return [Row(f"wide DAG: {n} independent trivial stages, `--jobs 2`", pipe_s,
                against=f"{n} SDK floors from 2 threads", reference=sdk_s, goal=sdk_s,
                note="goal: no slower than the SDK")]


def parallel(b: Bench) -> list[Row]:
    """Two independent stages that compute for `busy_s` each: with `--jobs 2` on 2 CPUs they overlap."""
    n = b.sizes.busy_s
    path = b.pipeline("busy", wl.busy(2, n))
    two, one = alternate(b.sizes.heavy, seconds("run", "--jobs", "2", path), seconds("run", "--jobs", "1", path))
    return [Row(f"parallel: 2 stages computing {n} s each, `--jobs 2`", two, against="`--jobs 1`", reference=one,
                goal=1.2 * n, note=f"goal: about {n} s (start-up and 2 container floors on top)")]


def no_op(b: Bench, name: str, path: Path, label: str) -> tuple[Row, Row]:
    """The cold run (once) and the no-op rerun (median) of `path`, with what the no-op read and started."""
    cold = run_pipe("run", path)
    runs: list[Timed] = []
    since = time.time()
    rerun, startup = alternate(b.sizes.repeat, seconds("run", path, keep=runs), STARTUP)
    started = containers_started(b.client, path.parent / "runs", since)
    if started:
        raise BenchError(f"the no-op reruns of {name} started {started} container(s)")
    read = median([r.read_bytes for r in runs])
    return (Row(f"{label}: first run (nothing cached)", cold.seconds, note="once"),
            Row(f"{label}: no-op rerun, all cached", rerun, against="start-up", reference=startup, goal=0.5,
                note=f"0 containers; read {read / MiB:.0f} MiB"))


def fan(b: Bench) -> list[Row]:
    n = 1 + b.sizes.fan
    return list(no_op(b, "fan", b.pipeline("fan", wl.fan(b.sizes.fan)), f"{n} stages"))


def big_input(b: Bench) -> list[Row]:
    folder = b.work / "input"
    data = wl.random_files(folder / "data", b.sizes.input_bytes, b.sizes.input_files)
    path = wl.write_pipeline(folder, wl.reading("data"))
    label = f"input {b.sizes.input_bytes / MiB:.0f} MiB in {b.sizes.input_files:,} files"
    cold, noop = no_op(b, "input", path, label)
    touched: list[Timed] = []

    def touch_and_run() -> float:  # a new mtime each round, in the past: the memo misses every file
        wl.set_mtimes(data, time.time() - wl.PAST_S - len(touched))
        return seconds("run", path, keep=touched)()

    after_touch, after_that = alternate(b.sizes.repeat, touch_and_run, seconds("run", path))
    read = median([t.read_bytes for t in touched])
    return [cold, noop, Row(f"{label}: rerun after touching every file", after_touch, against="no-op",
                            reference=after_that, goal=1.0, note=f"read {read / MiB:.0f} MiB")]


def hashing(b: Bench) -> list[Row]:
    data = wl.random_files(b.work / "input" / "data", b.sizes.input_bytes, b.sizes.input_files)
    size = sum(p.stat().st_size for p in wl.files_of(data))
    hash_tree(data)  # both sides read from a warm page cache

    def ours(workers: int) -> Callable[[], float]:
        def measure() -> float:
            started = time.perf_counter()
            hash_tree(data, workers=workers)
            return time.perf_counter() - started
        return measure

    def stdlib() -> float:  # what hash_tree would cost with hashlib's sha256 in its place: read and hash, serially
        started = time.perf_counter()
        for path in wl.files_of(data):
            with open(path, "rb") as f:
                hashlib.file_digest(f, "sha256")
        return time.perf_counter() - started

    sha = ["sh", "-c", "find . -type f -print0 | xargs -0 sha256sum > /dev/null"]
    default_s, serial_s, stdlib_s, sha_s = alternate(b.sizes.heavy, ours(HASH_WORKERS), ours(1), stdlib,
                                                     lambda: run_command(sha, cwd=data))
    gb = size / 1e9
    return [Row(f"cold hashing of the input ({size / MiB:.0f} MiB): hash_tree, no memo", gb / default_s, "GB/s",
                against="`sha256sum`", reference=gb / sha_s, note="page cache warm; ratio > 1 is faster"),
            Row(f"the same with workers=1 (hash_tree's default is {HASH_WORKERS} threads)", gb / serial_s, "GB/s",
                against="`sha256sum`", reference=gb / sha_s, note="diagnostic"),
            Row("hash_tree (blake3) against hashlib.sha256 over the same files, in-process", gb / default_s, "GB/s",
                against="hashlib", reference=gb / stdlib_s, note="why blake3: ratio > 1 is faster")]


def planning(b: Bench) -> list[Row]:
    from orchestrator.loader import load_pipeline
    from orchestrator.plan import build_plan

    n = b.sizes.dag
    path = b.pipeline("dag", wl.random_dag(n))

    def in_process() -> float:
        started = time.perf_counter()
        build_plan(load_pipeline(path))
        return time.perf_counter() - started

    validate, dag, startup = alternate(b.sizes.repeat, seconds("validate", "--no-images", path),
                                       seconds("dag", path), STARTUP)
    return [
        Row(f"planning {n:,} stages: `pipe validate --no-images`", validate, against="start-up",
            reference=startup, goal=1.0),
        Row(f"planning {n:,} stages: `pipe dag`", dag, against="start-up", reference=startup, goal=1.0),
        Row(f"planning {n:,} stages: load_pipeline + build_plan in-process", median(repeat(b.sizes.repeat,
            in_process)), goal=1.0, note="no interpreter start-up"),
    ]


def history(b: Bench) -> list[Row]:
    """`pipe status` of two copies of one pipeline, taken in turns: one with 1 run, one with many."""
    many, one = b.pipeline("history", wl.fan(3)), b.pipeline("history1", wl.fan(3))
    run_pipe("run", many)
    run_pipe("run", one)
    runs = wl.fill_history(f"sqlite:///{many.parent / 'runs' / 'pipe.db'}", b.sizes.history)
    many_s, one_s = alternate(b.sizes.repeat, seconds("status", many), seconds("status", one))
    return [Row(f"`pipe status`, {runs:,} runs in history", many_s, against="with 1 run", reference=one_s,
                goal=0.2, note="4 stages a run")]


def dvc(b: Bench) -> list[Row]:
    try:
        exe, version = install_dvc(b.work)
    except BenchError as e:
        return [Row("DVC side by side", None, note=f"skipped: DVC could not be installed ({e})")]
    pipe_side, dvc_side = compare(b.client, b.work / "peer", exe, b.sizes.heavy)
    rows = []
    for scenario in SCENARIOS:
        command = "`pipe status` vs `dvc status`" if scenario == "status" else "`pipe run` vs `dvc repro`"
        note = "" if scenario == "status" else \
            f"containers: pipe {_counts(pipe_side.containers[scenario])}, DVC {_counts(dvc_side.containers[scenario])}"
        rows.append(Row(f"4-stage docker pipeline, {scenario}: {command}", median(pipe_side.seconds[scenario]),
                        against=f"DVC {version}",
                        reference=median(dvc_side.seconds[scenario]), note=note))
    return rows


def peers(b: Bench) -> list[Row]:
    """Issue 20: no-op rerun and `pipe status` against DVC on the harness's workloads (goal: at most 0.75x)."""
    try:
        exe, version = install_dvc(b.work)
    except BenchError as e:
        return [Row("DVC on the harness's workloads", None, note=f"skipped: DVC could not be installed ({e})")]
    uid_gid = f"{os.getuid()}:{os.getgid()}"
    rows = []
    for kind in wl.PEER_WORKLOADS:
        folder = b.work / "peers" / kind
        wl.peer_workload(folder, kind, uid_gid, b.sizes.input_bytes, b.sizes.input_files)
        pipe_side, dvc_side = compare_noop(b.client, folder, exe, b.sizes.repeat)
        for scenario, command in (("cold", "`pipe run --jobs 2` vs `dvc repro`"),
                                  ("no-op", "`pipe run` vs `dvc repro`"), ("status", "`pipe status` vs `dvc status`")):
            rows.append(Row(f"{kind}, {scenario}: {command}", median(pipe_side.seconds[scenario]),
                            against=f"DVC {version}", reference=median(dvc_side.seconds[scenario]),
                            ratio_goal=None if scenario == "cold" else 0.75,
                            note="once; no goal (the cold overhead row has one)" if scenario == "cold" else ""))
    return rows


def cold(b: Bench) -> list[Row]:
    """Issue 20: a cold run against the no-network SDK floor of the same DAG at the same parallelism (2)."""
    uid_gid = f"{os.getuid()}:{os.getgid()}"
    rows = []
    for kind in ("ml4", "wide10"):
        folder = b.work / "cold" / kind
        wl.peer_workload(folder, kind, uid_gid, b.sizes.input_bytes, b.sizes.input_files)
        needs = wl.stage_needs(folder)

        def pipe_cold(folder: Path = folder) -> float:
            shutil.rmtree(folder / "runs", ignore_errors=True)
            return run_pipe("run", "--jobs", "2", folder / "pipeline.yaml").seconds

        def floor_dag(needs: dict[str, list[str]] = needs) -> float:
            return sdk_dag(b.client, b.work / "sdk", needs, 2)

        pipe_s, floor_s = alternate(b.sizes.heavy, pipe_cold, floor_dag)
        rows.append(Row(f"{kind} cold, `--jobs 2`, nothing cached", pipe_s,
                        against=f"{len(needs)} SDK floors, same DAG, 2 at a time", reference=floor_s,
                        ratio_goal=1.15, note="start-up included"))
    return rows


def plans(b: Bench) -> list[Row]:
    """Issue 20: `pipe status` and `pipe run --dry-run` of never-run DAGs (plan1000, plan5000)."""
    rows = []
    for size, goal in ((b.sizes.dag // 5, 0.3), (b.sizes.dag, 1.0)):
        path = b.pipeline(f"plan{size}", wl.random_dag(size))
        status, dry, startup = alternate(b.sizes.repeat, seconds("status", path),
                                         seconds("run", "--dry-run", path), STARTUP)
        rows += [Row(f"plan{size}, never run: `pipe status`", status, against="start-up", reference=startup,
                     goal=goal),
                 Row(f"plan{size}, never run: `pipe run --dry-run`", dry, against="start-up", reference=startup,
                     goal=goal)]
    return rows


def _counts(values: list[int]) -> str:
    return "/".join(map(str, sorted(set(values))))


def example(b: Bench) -> list[Row]:
    folder = b.work / "example"
    if not (REPO / "pipeline.yaml").exists():
        return [Row("example pipeline", None, note="skipped: no pipeline.yaml at the repository's root")]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy2(REPO / "pipeline.yaml", folder / "pipeline.yaml")
    for name in ("stages", "data"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, folder / name)
    path = folder / "pipeline.yaml"
    cold = []
    for _ in range(b.sizes.heavy):
        shutil.rmtree(folder / "runs", ignore_errors=True)
        since = time.time()
        cold.append(run_pipe("run", path).seconds)
        started = containers_started(b.client, folder / "runs", since)
    rerun, status, startup = alternate(b.sizes.repeat, seconds("run", path), seconds("status", path), STARTUP)
    return [Row("example pipeline: first run, nothing cached", median(cold), against="its no-op",
                reference=rerun, note=f"images already built; fresh state dir; {started} containers"),
            Row("example pipeline: no-op rerun, all cached", rerun, against="start-up", reference=startup,
                goal=0.5),
            Row("example pipeline: `pipe status`", status, against="start-up", reference=startup, goal=0.2)]


GROUPS: dict[str, Callable[[Bench], list[Row]]] = {
    "floor": floors, "chain": chain, "wide": wide, "parallel": parallel, "fan": fan, "input": big_input,
    "hashing": hashing, "planning": planning, "status": history, "dvc": dvc, "example": example,
    "plans": plans, "cold": cold, "peers": peers,
}
PEER_GROUPS = ("dvc", "example", "peers")


def machine(client: Any) -> list[tuple[str, str]]:
    info = client.info()
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpus (nproc)", f"{os.cpu_count()} × {cpu}"),
        ("memory", f"{mem_kib / 1024**2:.1f} GiB"),
        ("kernel", platform.release()),
        ("docker", f"{client.version()['Version']} ({info.get('Driver')}, cgroup v{info.get('CgroupVersion')})"),
        ("python", platform.python_version()),
        ("pipe commit", commit or "unknown"),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def render(rows: list[Row], judge: bool) -> str:
    table = [HEADER, *(r.cells(judge) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(path: Path, rows: list[Row], about: list[tuple[str, str]], sizes: Sizes, command: str,
                  busy: bool) -> None:
    text = [
        "# Benchmark results", "",
        (f"Written by `{command}` (bench/run.py); see bench/README.md for what each row measures. Each figure is "
         f"the median of {sizes.repeat} runs ({sizes.heavy} for rows that start 20 containers or more; rows "
         "marked \"once\" are single runs). The ratio is pipe's figure divided by the one named beside it."), "",
        "## Machine", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in about), "",
        *([BUSY_NOTE.format(cpus=os.cpu_count()), ""] if busy else []),
        "## Results", "", render(rows, judge=True), "",
    ]
    path.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition, no DVC or example (CI smoke)")
    parser.add_argument("-n", "--repeat", type=int, help="repetitions of each measurement (default 5; heavy rows "
                        "use at most 3)")
    parser.add_argument("--only", action="append", choices=sorted(GROUPS), help="run only these groups")
    parser.add_argument("--work", type=Path, default=BENCH / "work", help="where generated data and state go")
    parser.add_argument("--results", type=Path, help="the Markdown file to write (default: bench/RESULTS.md "
                        "in full mode, none with --quick)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeat:
        sizes = replace(sizes, repeat=args.repeat, heavy=min(args.repeat, sizes.heavy))
    results = args.results or (None if args.quick else BENCH / "RESULTS.md")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    client = docker.from_env(timeout=300)
    about = machine(client)
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    bench = Bench(client, work, sizes)
    groups = ["floor", *(g for g in GROUPS if g != "floor" and (not args.only or g in args.only))]
    rows: list[Row] = []
    failed = False
    started = time.perf_counter()
    try:
        for group in groups:
            if group in PEER_GROUPS and not sizes.peers:
                continue
            print(f"[{time.perf_counter() - started:6.1f}s] {group}", file=sys.stderr, flush=True)
            try:
                rows += GROUPS[group](bench)
            except (BenchError, OSError, docker.errors.DockerException) as e:
                failed = True
                rows.append(Row(group, None, note=f"FAILED: {e}"))
    finally:
        leftovers = remove_leftovers(client, work)
    if leftovers:
        failed = True
        rows.append(Row("leftover containers", None, note=f"FAILED: removed {', '.join(leftovers)}"))
    busy = busy or os.getloadavg()[0] > (os.cpu_count() or 1)
    about += [("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())),
              ("bench wall time", f"{time.perf_counter() - started:.0f} s")]
    print(render(rows, judge=not args.quick))
    if results is not None:
        command = "python3 bench/run.py" + (" --quick" if args.quick else "")
        write_results(results, rows, about, sizes, command, busy)
        print(f"wrote {results}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
