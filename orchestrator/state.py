"""The state folder of one pipeline: where history, cache, images memo and run outputs live, and its lock.

Layout (default `runs/` beside pipeline.yaml; `--state-dir` or PIPE_STATE_DIR move it):
    runs/pipe.db             history (SQLite; any SQLAlchemy URL through --db / PIPE_DB instead)
    runs/cache/              content-addressed stage outputs (cache.py)
    runs/images.json         build-context hash -> image id (images.py)
    runs/lock                flock held by the running `pipe run`; a crash releases it with the process. It keeps
                             two runs of one state dir apart on one host; whether a run lives is its lease's
                             word (store/lease.py), as history may be shared by checkouts and hosts
    runs/<run-id>/<stage>/   a stage's outputs; runs/<run-id>/<stage>.log its output
    runs/.gitignore          `*`, written when pipe creates the folder
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import LockHeld


@dataclass(frozen=True)
class StateDir:
    root: Path

    @classmethod
    def for_pipeline(cls, pipeline_root: Path, override: Path | str | None = None) -> StateDir:
        root = Path(override) if override else pipeline_root / "runs"
        return cls(root.resolve())

    def ensure(self) -> StateDir:
        """Create the folder private to the user (0700); history and cache may hold what stages wrote. A new
        folder gets a `.gitignore` of `*`, so `git add .` beside pipeline.yaml never takes in runs/."""
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            ignore = self.root / ".gitignore"
            if not ignore.exists():
                ignore.write_text("# made by pipe: the state folder (history, cache, outputs) stays out of git\n*\n")
        return self

    @property
    def default_db_url(self) -> str:
        return f"sqlite:///{self.root / 'pipe.db'}"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def images_memo(self) -> Path:
        return self.root / "images.json"

    @property
    def serve_dir(self) -> Path:
        """Serving's folder: its lock and the proxy's routing (serving.py, serve_proxy.py)."""
        return self.root / "serve"

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def outputs_dir(self, run_id: str, stage: str) -> Path:
        return self.root / run_id / stage

    def log_path(self, run_id: str, stage: str) -> Path:
        return self.root / run_id / f"{stage}.log"

    def meta_dir(self, run_id: str, stage: str) -> Path:
        """Mounted read-only at /pipe: params.json."""
        return self.root / run_id / ".pipe" / stage

    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    @contextmanager
    def lock(self, wait: bool = False, poll_s: float = 0.2) -> Iterator[RunLock]:
        """Hold the pipeline's lock for the block. Raises LockHeld at once (wait=False) naming the holder, or
        waits for it. flock dies with its process, so a crash or SIGKILL never leaves it stuck."""
        self.ensure()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        raise LockHeld(
                            f"another pipe run of this pipeline is running ({self.holder()}); "
                            "wait for it, or pass --wait"
                        ) from None
                    time.sleep(poll_s)
            held = RunLock(fd)
            held.describe(run_id=None)
            yield held
        finally:
            os.close(fd)  # releases the flock

    def holder(self) -> str:
        try:
            info = json.loads(self.lock_path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        run = info.get("run_id") or "starting"
        return f"run {run}, pid {info.get('pid', '?')}"


class RunLock:
    """The held lock; records who holds it so a refused run can name the running one."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def describe(self, run_id: str | None) -> None:
        data = json.dumps({"pid": os.getpid(), "run_id": run_id}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
