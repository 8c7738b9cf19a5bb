"""What pipe's serving path costs a request, and what a swap costs the requests in flight. See bench/README.md.

    python3 bench/serve_bench.py                  # 5 s per measurement, 3 rounds in turns; writes bench/SERVE_RESULTS.md
    python3 bench/serve_bench.py --quick          # 1 s, 1 round, no file written (the smoke test)

Load comes from `wrk` (Debian's archive; scripts/setup.sh installs it), from this host, bounded in time (`-d`),
against addresses on this host only: the published port on 127.0.0.1, the proxy's and the replica's addresses on
the engine's bridges (host-local interfaces; a replica publishes no port, the host reaches its internal network).
The model is busybox's httpd answering GET /metadata from the file the `train` stage wrote: the cheapest model
there is, so what the proxy adds is as large as it will ever look against the model's own time.

Rows, each measured in turns with the direct one (a, b, c, a, b, c, ...), the median of the rounds reported:
- direct: wrk to the replica at its internal address (the floor);
- proxy (bridge): to nginx at its address on the default bridge (pipe's proxy, without the engine's port mapping);
- proxy (published): to `serve.publish` on 127.0.0.1, as a user calls it (the engine's userland proxy included);
- swap: a window of --swap-seconds under load on the published port in which `pipe promote` swaps the model
  (1 s in), against the same window with no swap, in turns; failures are wrk's socket errors and non-2xx answers.
  Twice: with wrk's keep-alive connections, and with every request asking `Connection: close` (the test's client).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import yaml
from probes import BUSYBOX, BenchError, run_pipe

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from orchestrator.serve_docker import LABEL_SERVE_OWNER, ServeEngine
from orchestrator.serve_proxy import PROXY_PORT

TRAIN = ("cp /workspace/model.txt /outputs/metadata; echo ok > /outputs/health; "
         "echo '{\"score\": 1}' > /outputs/metrics.json")
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
HEADER = ["measure", "req/s", "p50", "p99", "failed", "against", "req/s ratio", "p50 ratio", "p99 ratio", "note"]


@dataclass(frozen=True)
class Load:
    """One wrk measurement."""

    requests: int
    rps: float
    p50_s: float
    p99_s: float
    failed: int  # socket errors (connect, read, write, timeout) and non-2xx/3xx answers

    @staticmethod
    def median(loads: list[Load]) -> Load:
        return Load(int(statistics.median(x.requests for x in loads)), statistics.median(x.rps for x in loads),
                    statistics.median(x.p50_s for x in loads), statistics.median(x.p99_s for x in loads),
                    sum(x.failed for x in loads))


@dataclass(frozen=True)
class Row:
    measure: str
    load: Load
    against: Row | None = None
    note: str = ""
    short: str = ""  # how a row that is against this one names it

    def cells(self) -> list[str]:
        base = self.against.load if self.against else None
        ratio = (lambda a, b: f"{a / b:.2f}" if b else "-")
        return [self.measure, f"{self.load.rps:.0f}", _ms(self.load.p50_s), _ms(self.load.p99_s),
                str(self.load.failed), (self.against.short or self.against.measure) if self.against else "-",
                ratio(self.load.rps, base.rps) if base else "-", ratio(self.load.p50_s, base.p50_s) if base else "-",
                ratio(self.load.p99_s, base.p99_s) if base else "-", self.note]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def parse_wrk(out: str) -> Load:
    """wrk --latency's report as numbers; BenchError when it is not one."""
    def seconds(pct: str) -> float:
        found = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.MULTILINE)
        if not found:
            raise BenchError(f"wrk printed no {pct}% latency:\n{out}")
        return float(found[1]) * UNITS[found[2]]

    total = re.search(r"^\s*(\d+) requests in", out, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if not total or not rps:
        raise BenchError(f"not a wrk report:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = (sum(int(x) for x in errors.groups()) if errors else 0) + (int(non2xx[1]) if non2xx else 0)
    return Load(int(total[1]), float(rps[1]), seconds("50"), seconds("99"), failed)


def wrk_argv(address: str, seconds: float, connections: int, close: bool = False) -> list[str]:
    """wrk keeps its connections alive unless `close`: then every request asks `Connection: close` (a new
    connection each), as the zero-failure test's client does."""
    return ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s",
            *(["-H", "Connection: close"] if close else []), f"http://{address}/metadata"]


def wrk(address: str, seconds: float, connections: int) -> Load:
    done = subprocess.run(wrk_argv(address, seconds, connections), capture_output=True, text=True, check=False,
                          timeout=seconds + 30)
    if done.returncode != 0:
        raise BenchError(f"wrk against {address} exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A busybox model behind pipe's proxy: two runs to swap between, the addresses to reach it at."""

    def __init__(self, client: Any, folder: Path) -> None:
        self.client, self.folder = client, folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.port = free_port()
        self.path = folder / "pipeline.yaml"
        self.path.write_text(yaml.safe_dump({
            "name": "servebench",
            "stages": {"train": {"image": BUSYBOX, "command": TRAIN, "inputs": ["model.txt"],
                                 "metrics": "metrics.json", "gate": {"metric": "score", "min": 0.5}}},
            "serve": {"model": "train", "image": BUSYBOX, "command": ["httpd", "-f", "-p", "8080", "-h", "/model"],
                      "port": 8080, "publish": f"127.0.0.1:{self.port}", "promote": "manual",
                      "resources": {"cpus": 1, "memory": "64m", "pids": 256},
                      "health": {"path": "/health", "interval": "200ms", "timeout": "1s", "healthy_after": 1,
                                 "start_timeout": "20s"}},
        }, sort_keys=False))
        self.runs: list[str] = []
        for model in ("v1\n", "v2\n"):
            (folder / "model.txt").write_text(model)
            run_pipe("run", self.path)
            self.runs.append(json.loads(run_pipe("runs", self.path, "--json", "--limit", "1").stdout)[0]["id"])
        run_pipe("serve", "up", self.path, "--run", self.runs[0])
        self.owner = str((folder / "runs").resolve())
        self.engine = ServeEngine(client, self.owner)

    def direct(self) -> str:
        replicas = [r for r in self.engine.find().replicas if r.address]
        if len(replicas) != 1:
            raise BenchError(f"expected one running replica, found {len(replicas)}")
        return str(replicas[0].address)

    def bridge(self) -> str:
        proxy = self.client.containers.get(self.engine.proxy_name)
        ip = proxy.attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
        return f"{ip}:{PROXY_PORT}"

    def published(self) -> str:
        return f"127.0.0.1:{self.port}"

    def down(self) -> list[str]:
        """`pipe serve down`; the names of any serving container still there (removed here)."""
        run_pipe("serve", "down", self.path, expect=None)
        left = self.client.containers.list(all=True, filters={"label": f"{LABEL_SERVE_OWNER}={self.owner}"})
        for c in left:
            c.remove(force=True)
        return [c.name for c in left]


def swap_window(served: Served, run_id: str | None, seconds: float, connections: int, close: bool
                ) -> tuple[Load, float, bool]:
    """wrk on the published port for `seconds`; with a run id, `pipe promote RUN` starts 1 s in. The load, how long
    the promotion took, and whether it ended inside the window."""
    wrk_proc = subprocess.Popen(wrk_argv(served.published(), seconds, connections, close), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    started = time.perf_counter()
    promote_s, inside = 0.0, True
    try:
        if run_id is not None:
            time.sleep(1.0)
            promote_s = run_pipe("promote", run_id, served.path).seconds
            inside = time.perf_counter() - started < seconds - 0.2
        out, err = wrk_proc.communicate(timeout=seconds + 30)
    finally:
        if wrk_proc.poll() is None:
            wrk_proc.kill()
            wrk_proc.wait()
    if wrk_proc.returncode != 0:
        raise BenchError(f"wrk exited {wrk_proc.returncode}: {err.strip()}")
    return parse_wrk(out), promote_s, inside


def measure(served: Served, rounds: int, seconds: float, swap_seconds: float, connections: int) -> list[Row]:
    direct: list[Load] = []
    bridge: list[Load] = []
    published: list[Load] = []
    for _ in range(rounds):  # in turns, so a change in the machine's load moves all three alike
        direct.append(wrk(served.direct(), seconds, connections))
        bridge.append(wrk(served.bridge(), seconds, connections))
        published.append(wrk(served.published(), seconds, connections))
    floor = Row("direct: the replica at its internal address", Load.median(direct), short="direct")
    public = Row(f"proxy (published): {served.published()}, as users call it", Load.median(published), floor,
                 short="proxy (published)")
    rows = [floor, Row("proxy (bridge): pipe's nginx at its bridge address", Load.median(bridge), floor), public]
    swaps = 0
    for close in (False, True):
        calm: list[Load] = []
        during: list[Load] = []
        took: list[float] = []
        outside = 0
        for _ in range(rounds):  # in turns: a window without a swap, then one with
            calm.append(swap_window(served, None, swap_seconds, connections, close)[0])
            swaps += 1
            load, promote_s, inside = swap_window(served, served.runs[swaps % 2], swap_seconds, connections, close)
            during.append(load)
            took.append(promote_s)
            outside += not inside
        clients = "`Connection: close` clients" if close else "keep-alive clients"
        quiet = Row(f"no swap, {clients}: published port, {swap_seconds:g} s windows", Load.median(calm), public,
                    short=f"no swap, {'close' if close else 'keep-alive'}")
        note = (f"{rounds} swap(s), `pipe promote` took {statistics.median(took):.2f} s (median)"
                + (f"; {outside} ran past the window" if outside else ""))
        rows += [quiet, Row(f"during a swap, {clients}: the same window, `pipe promote` 1 s in",
                            Load.median(during), quiet, note)]
    return rows


def render(rows: list[Row]) -> str:
    table = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(path: Path, rows: list[Row], about: list[tuple[str, str]], command: str, rounds: int,
                  seconds: float, connections: int) -> None:
    text = [
        "# Serving benchmark", "",
        (f"Written by `{command}` (bench/serve_bench.py; bench/README.md says what each row measures). wrk, 1 thread "
         f"and {connections} connections, {seconds:g} s a measurement, {rounds} round(s) taken in turns; the "
         "median of the rounds is shown and failures are summed. Ratios: the row's figure over the one it is "
         "against (req/s below 1 and latency above 1 is what the path costs)."), "",
        "## Machine", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in about), "",
        "## Results", "", render(rows), "",
    ]
    path.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s measurements, 1 round, no file (the smoke test)")
    parser.add_argument("-n", "--rounds", type=int, help="rounds of every measurement, in turns (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds of each wrk measurement (default 5)")
    parser.add_argument("--swap-seconds", type=float, help="seconds of each swap window (default 12)")
    parser.add_argument("-c", "--connections", type=int, default=8, help="wrk's connections (default 8)")
    parser.add_argument("--work", type=Path, default=BENCH / "work", help="where the pipeline and its state go")
    parser.add_argument("--results", type=Path, help="the Markdown file to write (default: bench/SERVE_RESULTS.md "
                        "in full mode, none with --quick)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk; scripts/setup.sh does)", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    swap_seconds = args.swap_seconds or (8.0 if args.quick else 12.0)
    results = args.results or (None if args.quick else BENCH / "SERVE_RESULTS.md")
    from run import machine  # the same machine table as bench/RESULTS.md

    client = docker.from_env(timeout=300)
    about = machine(client)
    started = time.perf_counter()
    served: Served | None = None
    failed = False
    rows: list[Row] = []
    try:
        served = Served(client, args.work.resolve() / "serve")
        rows = measure(served, rounds, seconds, swap_seconds, args.connections)
    except (BenchError, OSError, docker.errors.DockerException) as e:
        failed = True
        print(f"FAILED: {e}", file=sys.stderr)
    finally:
        left = served.down() if served is not None else []
    if left:
        failed = True
        print(f"FAILED: serving containers left behind: {', '.join(left)}", file=sys.stderr)
    about += [("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())),
              ("bench wall time", f"{time.perf_counter() - started:.0f} s")]
    if rows:
        print(render(rows))
    if results is not None and rows and not failed:
        command = " ".join(["python3 bench/serve_bench.py", *(argv if argv is not None else sys.argv[1:])])
        write_results(results, rows, about, command, rounds, seconds, args.connections)
        print(f"wrote {results}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
