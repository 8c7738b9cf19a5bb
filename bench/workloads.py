"""The bench's inputs, generated under the work folder: pipelines of trivial busybox stages, a folder of random
files, a 5,000-stage DAG, a 4-stage pipeline written both for pipe and for DVC, and a history of many runs."""

from __future__ import annotations

import os
import random
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from probes import BUSYBOX, LABEL_MANAGED, LABEL_PIPELINE

PAST_S = 60  # generated files get an mtime this far back: the hash memo skips files modified in the last 2 s


def write_pipeline(folder: Path, stages: dict[str, dict[str, Any]], fresh: bool = True) -> Path:
    """pipeline.yaml in `folder`; `fresh` removes the folder's state (runs/) first, so nothing is cached."""
    folder.mkdir(parents=True, exist_ok=True)
    if fresh:
        shutil.rmtree(folder / "runs", ignore_errors=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"name": folder.name, "stages": stages}, sort_keys=False))
    return path


def trivial(**extra: Any) -> dict[str, Any]:
    return {"image": BUSYBOX, "command": ["true"], **extra}


def chain(length: int) -> dict[str, dict[str, Any]]:
    """`length` trivial stages, each needing the one before, never cached."""
    return {f"s{i:03d}": trivial(cache=False, **({"needs": [f"s{i - 1:03d}"]} if i else {}))
            for i in range(length)}


def wide(width: int) -> dict[str, dict[str, Any]]:
    """`width` independent trivial stages, never cached."""
    return {f"w{i:03d}": trivial(cache=False) for i in range(width)}


def busy(width: int, seconds: int) -> dict[str, dict[str, Any]]:
    """`width` independent stages that each keep a CPU busy for `seconds` (a shell loop), never cached."""
    loop = f"timeout {seconds} sh -c 'while :; do :; done'; true"  # busy for exactly `seconds`, then exit 0
    return {f"busy{i}": {"image": BUSYBOX, "command": loop, "cache": False} for i in range(width)}


def fan(leaves: int) -> dict[str, dict[str, Any]]:
    """One source stage and `leaves` stages reading its output: 1 + leaves cached stages."""
    stages: dict[str, dict[str, Any]] = {
        "source": {"image": BUSYBOX, "command": "echo seed > /outputs/seed"}}
    for i in range(leaves):
        stages[f"leaf{i:03d}"] = {"image": BUSYBOX, "needs": ["source"],
                                  "command": f"cat /inputs/source/seed > /outputs/out{i}"}
    return stages


def reading(input_rel: str) -> dict[str, dict[str, Any]]:
    """One stage whose declared input is the folder `input_rel`; it counts the files."""
    return {"count": {"image": BUSYBOX, "inputs": [input_rel],
                      "command": f"find {input_rel} -type f | wc -l > /outputs/count"}}


def random_dag(size: int, seed: int = 9) -> dict[str, dict[str, Any]]:
    """`size` stages, each needing up to 3 random earlier ones: a DAG with many paths, for planning only."""
    rng = random.Random(seed)
    stages: dict[str, dict[str, Any]] = {}
    for i in range(size):
        needs = sorted({f"n{rng.randrange(i):05d}" for _ in range(min(i, rng.randint(1, 3)))})
        stages[f"n{i:05d}"] = trivial(**({"needs": needs} if needs else {}))
    return stages


def random_files(folder: Path, total_bytes: int, count: int) -> Path:
    """`count` files of random bytes summing to `total_bytes`, 100 to a sub-folder, made once and kept: a folder
    that already holds that many files of that size (a stat each, not a read) is reused by the next bench run."""
    if folder.is_dir():
        files = files_of(folder)
        if len(files) == count and sum(p.stat().st_size for p in files) == total_bytes:
            return folder
    shutil.rmtree(folder, ignore_errors=True)
    size, extra = divmod(total_bytes, count)
    for i in range(count):
        sub = folder / f"d{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.bin").write_bytes(os.urandom(size + (1 if i < extra else 0)))
    set_mtimes(folder, time.time() - PAST_S)
    return folder


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def set_mtimes(folder: Path, when: float) -> int:
    """Give every file under `folder` the mtime `when` (content untouched): `touch` without the racy window."""
    paths = files_of(folder)
    for path in paths:
        os.utime(path, (when, when))
    return len(paths)


def peer_pipeline(folder: Path, uid_gid: str) -> None:
    """The same 4-stage docker pipeline as pipeline.yaml (pipe) and dvc.yaml (DVC), over raw.txt and extra.txt:
    clean <- raw.txt; side <- extra.txt; train <- clean; report <- train, side."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {  # stage: (pipe's command, DVC's command), the same work on the same files
        "clean": ("tr a-z A-Z < raw.txt > /outputs/clean.txt", "tr a-z A-Z < raw.txt > clean.txt"),
        "side": ("wc -c < extra.txt > /outputs/side.txt", "wc -c < extra.txt > side.txt"),
        "train": ("sort /inputs/clean/clean.txt > /outputs/model.txt", "sort clean.txt > model.txt"),
        "report": ("cat /inputs/train/model.txt /inputs/side/side.txt > /outputs/report.txt",
                   "cat model.txt side.txt > report.txt"),
    }
    deps = {"clean": ["raw.txt"], "side": ["extra.txt"], "train": ["clean.txt"], "report": ["model.txt", "side.txt"]}
    needs = {"train": ["clean"], "report": ["train", "side"]}
    inputs = {"clean": ["raw.txt"], "side": ["extra.txt"]}
    write_pipeline(folder, {
        name: {"image": BUSYBOX, "command": pipe_cmd, **({"inputs": inputs[name]} if name in inputs else {}),
               **({"needs": needs[name]} if name in needs else {})}
        for name, (pipe_cmd, _) in scripts.items()})
    owner = dvc_owner(folder)
    docker = (f"docker run --rm --label {LABEL_MANAGED}=1 --label {LABEL_PIPELINE}={owner} --network none "
              f"-u {uid_gid} -v {folder}:/w -w /w {BUSYBOX} sh -c")
    dvc_stages = {name: {"cmd": f"{docker} '{dvc_cmd}'", "deps": deps[name], "outs": [f"{name_out(name)}"]}
                  for name, (_, dvc_cmd) in scripts.items()}
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": dvc_stages}, sort_keys=False, width=1000))
    (folder / "raw.txt").write_text("the quick brown fox\njumps over\nthe lazy dog\n")
    (folder / "extra.txt").write_text("extra 0\n")


def name_out(stage: str) -> str:
    return {"clean": "clean.txt", "side": "side.txt", "train": "model.txt", "report": "report.txt"}[stage]


def dvc_owner(folder: Path) -> Path:
    """The pipeline label the DVC stages' containers carry, so the engine's events count them apart."""
    return folder / "dvc"


def fill_history(db_url: str, runs: int) -> int:
    """Copy the one real run recorded in `db_url` (with its stage rows) into `runs - 1` older runs, in bulk.

    Goes through the store's own engine and tables, one transaction; returns the runs now in history."""
    from sqlalchemy import func, insert, select

    from orchestrator.store.db import open_engine
    from orchestrator.store.models import Base

    run_table, stage_table = Base.metadata.tables["run"], Base.metadata.tables["stage_run"]
    engine = open_engine(db_url)
    try:
        with engine.begin() as conn:
            run = dict(conn.execute(select(run_table)).mappings().one())
            stages = [dict(s) for s in conn.execute(
                select(stage_table).where(stage_table.c.run_id == run["id"])).mappings()]
            run_rows, stage_rows = [], []
            for i in range(1, runs):
                shift = timedelta(minutes=10 * i)
                started = run["started_at"] - shift
                run_id = f"{started:%Y%m%d-%H%M%S}-{i % 65536:04x}"
                run_rows.append({**run, "id": run_id, "started_at": started,
                                 "finished_at": run["finished_at"] and run["finished_at"] - shift})
                for s in stages:
                    stage_rows.append({**{k: v for k, v in s.items() if k != "id"}, "run_id": run_id,
                                       "started_at": s["started_at"] and s["started_at"] - shift,
                                       "finished_at": s["finished_at"] and s["finished_at"] - shift})
            if run_rows:
                conn.execute(insert(run_table), run_rows)
                conn.execute(insert(stage_table), stage_rows)
            return int(conn.execute(select(func.count()).select_from(run_table)).scalar_one())
    finally:
        engine.dispose()


# ---- issue 20: the harness's workloads, each written both for pipe and for DVC ---------------------------------

PEER_WORKLOADS = ("ml4", "wide10", "wide100", "large_1file", "large_10k")


def big_file(path: Path, total_bytes: int) -> Path:
    """One file of random bytes (made once, reused while its size matches), with an mtime in the past."""
    if not (path.is_file() and path.stat().st_size == total_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            left = total_bytes
            while left:
                chunk = os.urandom(min(left, 16 * 1024 * 1024))
                f.write(chunk)
                left -= len(chunk)
        when = time.time() - PAST_S
        os.utime(path, (when, when))
    return path


def peer_workload(folder: Path, kind: str, uid_gid: str, input_bytes: int, input_files: int) -> None:
    """`kind` of PEER_WORKLOADS as pipeline.yaml and dvc.yaml in `folder` (ml4 is peer_pipeline). wideN: N
    independent stages reading seed.txt; large_1file: one stage reading one file of `input_bytes`; large_10k: one
    stage reading a folder of `input_files` files summing to `input_bytes`."""
    if kind == "ml4":
        peer_pipeline(folder, uid_gid)
        return
    folder.mkdir(parents=True, exist_ok=True)
    stages: dict[str, tuple[str, str, str, str]] = {}  # name: (input, pipe cmd, dvc cmd, dvc out)
    if kind.startswith("wide"):
        (folder / "seed.txt").write_text("seed\n")
        for i in range(int(kind.removeprefix("wide"))):
            stages[f"w{i:03d}"] = ("seed.txt", f"cat seed.txt > /outputs/w{i:03d}.txt", f"cat seed.txt > w{i:03d}.txt",
                                   f"w{i:03d}.txt")
    elif kind == "large_1file":
        big_file(folder / "big.bin", input_bytes)
        stages["count"] = ("big.bin", "wc -c < big.bin > /outputs/size.txt", "wc -c < big.bin > size.txt", "size.txt")
    elif kind == "large_10k":
        random_files(folder / "data", input_bytes, input_files)
        stages["count"] = ("data", "find data -type f | wc -l > /outputs/count.txt",
                           "find data -type f | wc -l > count.txt", "count.txt")
    else:
        raise ValueError(f"unknown workload {kind}")
    write_pipeline(folder, {name: {"image": BUSYBOX, "command": pipe_cmd, "inputs": [dep]}
                            for name, (dep, pipe_cmd, _, _) in stages.items()})
    owner = dvc_owner(folder)
    docker = (f"docker run --rm --label {LABEL_MANAGED}=1 --label {LABEL_PIPELINE}={owner} --network none "
              f"-u {uid_gid} -v {folder}:/w -w /w {BUSYBOX} sh -c")
    dvc_stages = {name: {"cmd": f"{docker} '{dvc_cmd}'", "deps": [dep], "outs": [out]}
                  for name, (dep, _, dvc_cmd, out) in stages.items()}
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": dvc_stages}, sort_keys=False, width=1000))


def dvc_outs(folder: Path) -> list[str]:
    """The outputs dvc.yaml in `folder` declares: what a reset removes."""
    data = yaml.safe_load((folder / "dvc.yaml").read_text())
    return [out for stage in data["stages"].values() for out in stage.get("outs", [])]


def stage_needs(folder: Path) -> dict[str, list[str]]:
    """stage -> its needs, from pipeline.yaml in `folder`: the DAG the SDK floor runs at pipe's parallelism."""
    data = yaml.safe_load((folder / "pipeline.yaml").read_text())
    return {name: list(stage.get("needs", [])) for name, stage in data["stages"].items()}
