"""The remote cache as a user meets it (issue 15): `remote:` in pipeline.yaml, push after a run, a second machine
(a second state dir and history) restoring every stage from the remote without a container, `pipe push`/`pull`
(--json), corrupt or deleted blobs on the server, the server cut off mid-push, wrong credentials, a missing
bucket, and `pipe cache gc --remote`. Real engine, real radosgw (scripts/s3.sh), `pipe` as a subprocess."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.hashing import hash_file
from tests.conftest import BUSYBOX, S3Bucket
from tests.e2e.helpers import containers_created, pipe, pipe_json

MiB = 1 << 20


def spec(s3: S3Bucket, push: str = "auto", endpoint: str | None = None, big: int = 0,
         url: str | None = None) -> dict[str, Any]:
    make_big = f"head -c {big} /dev/urandom > /outputs/big.bin; " if big else ""
    return {
        "stages": {
            "data": {"image": BUSYBOX, "inputs": ["raw.txt"],
                     "command": f"{make_big}cp raw.txt /outputs/rows.txt; mkdir /outputs/empty"},
            "train": {"image": BUSYBOX, "needs": ["data"], "params": {"k": 3},
                      "command": "wc -l < /inputs/data/rows.txt > /outputs/model.txt"},
            "evaluate": {"image": BUSYBOX, "needs": ["train"], "metrics": "metrics.json",
                         "command": "echo '{\"rows\": '$(cat /inputs/train/model.txt)'}' > /outputs/metrics.json"},
        },
        "remote": {"url": url or s3.url(), "endpoint": endpoint or s3.endpoint, "push": push},
    }


def state(path: Path, name: str) -> list[str]:
    """--state-dir of a machine of its own: its cache, runs and history database (SQLite in it)."""
    return ["--state-dir", str(path.parent / name)]


def run_json(path: Path, *args: str) -> dict[str, Any]:
    done = pipe("run", path, *args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    result["stderr"] = done.stderr
    return result


def outputs(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """stage -> {relative path: blake3} of what the run left in its outputs folders."""
    found = {}
    for name, stage in report["stages"].items():
        root = Path(stage["outputs_path"])
        found[name] = {str(p.relative_to(root)): hash_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return found


def test_a_second_machine_restores_every_stage_from_the_remote_starting_no_container(
    docker: Any, s3: S3Bucket, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(spec(s3), files={"raw.txt": "a\nb\nc\n"})
    first = run_json(path, *state(path, "a"))
    assert "pushed 3 cache entries" in first["stderr"]
    assert sum(k.startswith("pipe/manifests/") for k in s3.object_keys()) == 3

    machine = state(path, "b")
    status = pipe_json("status", path, *machine)
    dry = pipe_json("run", path, "--dry-run", *machine)
    for view in (status["next_run"], dry["stages"]):
        assert {n: (d["status"], d["remote"]) for n, d in view.items()} == {
            n: ("cached", s3.url()) for n in ("data", "train", "evaluate")}
    plain = pipe("run", path, "--dry-run", *machine)
    assert plain.stdout.count(": cached (remote): cached (remote) from run") == 3, plain.stdout

    since = time.time()
    second = run_json(path, *machine)
    assert containers_created(docker, path.parent / "b", since) == 0
    assert {n: s["status"] for n, s in second["stages"].items()} == dict.fromkeys(first["stages"], "cached")
    for stage in second["stages"].values():
        assert stage["reason"].startswith(f"cached (remote) from run {first['run_id']}, fetched ")
        assert stage["cached_from"] == first["run_id"]
    assert outputs(second) == outputs(first)  # byte-identical
    assert (Path(second["stages"]["data"]["outputs_path"]) / "empty").is_dir()
    assert second["stages"]["evaluate"]["metrics"] == first["stages"]["evaluate"]["metrics"] == {"rows": 3}
    assert "pushed" not in second["stderr"]  # what came from the remote is not sent back
    again = pipe_json("status", path, *machine)  # now a local hit on machine b
    assert {d["remote"] for d in again["next_run"].values()} == {None}


def test_push_and_pull_by_hand_with_json(docker: Any, s3: S3Bucket, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline(spec(s3, push="manual"), files={"raw.txt": "a\n"})
    first = run_json(path, *state(path, "a"))
    assert s3.object_keys() == [] and "pushed" not in first["stderr"]  # push: manual

    pushed = pipe_json("push", str(path), *state(path, "a"))
    assert set(pushed) == {"action", "remote", "run_id", "ok", "error", "files", "bytes", "seconds", "entries"}
    assert (pushed["action"], pushed["ok"], pushed["run_id"], pushed["remote"]) == ("push", True, first["run_id"],
                                                                                    s3.url())
    assert [(e["stage"], e["status"]) for e in pushed["entries"]] == [
        ("data", "pushed"), ("train", "pushed"), ("evaluate", "pushed")]
    assert pushed["files"] == 3 and pushed["bytes"] > 0
    assert {e["status"] for e in pipe_json("push", "latest", str(path), *state(path, "a"))["entries"]} == {"present"}

    only = pipe_json("pull", str(path), "--stage", "data", *state(path, "c"))
    assert [(e["stage"], e["status"]) for e in only["entries"]] == [("data", "pulled")]
    pulled = pipe_json("pull", str(path), *state(path, "c"))  # the keys the next run would look up
    assert [(e["stage"], e["status"]) for e in pulled["entries"]] == [
        ("data", "present"), ("train", "pulled"), ("evaluate", "pulled")]
    since = time.time()
    local = run_json(path, *state(path, "c"))
    assert containers_created(docker, path.parent / "c", since) == 0
    assert all(s["reason"] == f"cached from run {first['run_id']}" for s in local["stages"].values())
    assert outputs(local) == outputs(first)


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_damaged_blob_on_the_server_is_a_warning_a_rerun_and_a_reupload(
    docker: Any, s3: S3Bucket, make_pipeline: Callable[..., Path], damage: str
) -> None:
    path = make_pipeline(spec(s3), files={"raw.txt": "a\nb\n"})
    first = run_json(path, *state(path, "a"))
    digest = next(iter(outputs(first)["train"].values()))
    key = f"pipe/blobs/{digest[:2]}/{digest}"
    if damage == "corrupt":
        s3.raw.put_object(Bucket=s3.name, Key=key, Body=b"9\n")  # same size, other bytes
    else:
        s3.raw.delete_object(Bucket=s3.name, Key=key)

    since = time.time()
    second = run_json(path, *state(path, "b"))
    assert "warning: train: remote cache entry" in second["stderr"] and "is damaged" in second["stderr"]
    statuses = {n: s["status"] for n, s in second["stages"].items()}
    assert statuses["data"] == "cached" and statuses["train"] == "succeeded"  # the miss re-ran it
    assert containers_created(docker, path.parent / "b", since) >= 1
    assert "pushed 1 cache entry" in second["stderr"]  # the re-run's entry filed again
    body = s3.raw.get_object(Bucket=s3.name, Key=key)["Body"].read()
    assert body == b"2\n"

    since = time.time()
    third = run_json(path, *state(path, "c"))
    assert {s["status"] for s in third["stages"].values()} == {"cached"}
    assert containers_created(docker, path.parent / "c", since) == 0


class CuttableProxy:
    """A TCP forwarder on loopback in front of the real server, which drops every connection, and refuses new
    ones, once `cut_after` bytes went upstream: the server seen from pipe stops answering mid-transfer."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target, self.cut_after, self.sent = target, cut_after, 0
        self.cut = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if self.cut.is_set():
                    break
                dst.sendall(data)
                if counted:
                    with self._lock:
                        self.sent += len(data)
                        over = self.sent > self.cut_after
                    if over:
                        self.drop()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop(self) -> None:
        self.cut.set()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def heal(self) -> None:
        self.cut.clear()
        self.cut_after = 1 << 62

    def close(self) -> None:
        self._listener.close()
        self.drop()


def test_a_server_lost_mid_push_leaves_the_run_green_nothing_half_visible_and_a_later_push_finishes(
    docker: Any, s3: S3Bucket, make_pipeline: Callable[..., Path]
) -> None:
    host, port = s3.endpoint.removeprefix("http://").split(":")
    proxy = CuttableProxy((host, int(port)), cut_after=2 * MiB)  # the run's check and HEADs are small
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        path = make_pipeline(spec(s3, endpoint=endpoint, big=8 * MiB), files={"raw.txt": "a\n"})
        first = run_json(path, *state(path, "a"))
        assert proxy.cut.is_set()
        assert first["status"] == "succeeded" and first["exit_code"] == 0
        assert f"warning: push to {s3.url()} failed" in first["stderr"]
        assert f"pipe push {first['run_id']}" in first["stderr"]
        big = outputs(first)["data"]["big.bin"]
        assert f"pipe/blobs/{big[:2]}/{big}" not in s3.object_keys()  # no partial object
        assert not any(k.startswith("pipe/manifests/") for k in s3.object_keys())  # no entry half-visible

        proxy.heal()
        done = pipe("push", str(path), *state(path, "a"), "--json")
        assert done.returncode == 0, done.stderr
        assert {e["status"] for e in json.loads(done.stdout)["entries"]} == {"pushed"}
        since = time.time()
        second = run_json(path, *state(path, "b"))
        assert {s["status"] for s in second["stages"].values()} == {"cached"}
        assert containers_created(docker, path.parent / "b", since) == 0
        assert outputs(second) == outputs(first)
    finally:
        proxy.close()


def test_wrong_credentials_are_one_line_and_exit_4_without_the_secret(
    docker: Any, s3: S3Bucket, make_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_pipeline(spec(s3), files={"raw.txt": "a\n"})
    secret = "wrong-secret-0f9e8d7c6b5a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    for args in (("run", path), ("push", str(path)), ("pull", str(path)), ("push", str(path), "--json")):
        done = pipe(*args, *state(path, "a"))
        assert done.returncode == 4, done.stdout + done.stderr
        assert done.stderr.strip().splitlines() == [f"error: remote {s3.url()}: access denied (check AWS credentials)"]
        assert secret not in done.stdout + done.stderr
    assert not (path.parent / "a" / "pipe.db").exists()  # the run stopped before it began


def test_a_bucket_that_does_not_exist_is_named_and_exit_4(
    docker: Any, s3: S3Bucket, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(spec(s3, url="s3://pipe-no-such-bucket-7c1d/x/"), files={"raw.txt": "a\n"})
    for args in (("run", path), ("push", str(path))):
        done = pipe(*args, *state(path, "a"))
        assert done.returncode == 4
        assert done.stderr.strip() == "error: remote s3://pipe-no-such-bucket-7c1d/x/: bucket pipe-no-such-bucket-7c1d does not exist"


def test_cache_gc_remote_keeps_what_kept_runs_use_and_what_is_young(
    docker: Any, s3: S3Bucket, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline(spec(s3), files={"raw.txt": "a\n"})
    machine = state(path, "a")
    run_json(path, *machine)
    run_json(path, "-p", "train.k=4", *machine)  # a new train entry: the old one is used by the first run only
    young = pipe_json("cache", "gc", str(path), "--remote", "--keep-runs", "1", "--dry-run", *machine)
    assert (young["entries_removed"], young["dry_run"]) == (0, True) and young["young_kept"] >= 1
    dry = pipe_json("cache", "gc", str(path), "--remote", "--keep-runs", "1", "--grace", "0s", "--dry-run", *machine)
    assert set(dry) == {"dry_run", "remote", "grace_s", "entries_removed", "entries_kept", "young_kept",
                        "blobs_removed", "blob_bytes", "removed_keys"}
    assert dry["entries_removed"] == 1 and dry["entries_kept"] == 3
    before = s3.object_keys()
    done = pipe_json("cache", "gc", str(path), "--remote", "--keep-runs", "1", "--grace", "0s", *machine)
    assert done["removed_keys"] == dry["removed_keys"]
    assert f"pipe/manifests/{dry['removed_keys'][0]}.json" in before
    assert f"pipe/manifests/{dry['removed_keys'][0]}.json" not in s3.object_keys()
    since = time.time()
    other = run_json(path, "-p", "train.k=4", *state(path, "b"))  # what the kept run uses is still there
    assert {s["status"] for s in other["stages"].values()} == {"cached"}
    assert containers_created(docker, path.parent / "b", since) == 0
