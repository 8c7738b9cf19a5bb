"""The swarm agent's push and fetch scripts, run for real on this host (busybox sh, rclone, b3sum, the agent
image's very binaries) against the real S3 server: the node's listing must give the TreeDigest hash_tree gives
for the same folder, its blobs must be the remote cache's, and a tree placed from blobs must be that folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator import handoff
from orchestrator.errors import RemoteError
from orchestrator.hashing import TreeDigest, hash_tree
from orchestrator.objectstore import ObjectStore
from orchestrator.remote import blob_key


def _outputs(root: Path) -> None:
    (root / "d" / "empty").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("f")
    (root / "same.txt").write_text("f")  # the content of d/f.txt again: one blob
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "a name with spaces.bin").write_bytes(os.urandom(3 << 20))
    (root / "link").symlink_to("d/f.txt")
    (root / "dangling").symlink_to("/nowhere at all")


class Agent:
    """The scripts under `root` (the node's hand-off folder), rclone's remote "s3" at the test server."""

    def __init__(self, tmp: Path, s3: Any) -> None:
        self.root = tmp / "h"
        self.root.mkdir()
        conf = tmp / "rclone.conf"
        conf.write_text(handoff.rclone_config(s3.endpoint, os.environ["AWS_ACCESS_KEY_ID"],
                                              os.environ["AWS_SECRET_ACCESS_KEY"]))
        self.env = {"PATH": "/usr/bin:/bin", "RCLONE_CONFIG": str(conf)}
        self.prefix = f"{s3.name}/pipe/"

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True, env=self.env,
                              timeout=120, check=False)

    def push(self, task: str, folder: Path) -> str:
        """Runs the push script on `folder` as m1 of `task`; the listing's sha256 it printed."""
        (self.root / task).mkdir(parents=True)
        os.rename(folder, self.root / task / "m1")
        done = self.sh(handoff.push_script(task, 1, f"handoff/out/{task.replace('/', '-')}.listing", self.prefix,
                                           root=str(self.root)))
        assert done.returncode == 0, done.stdout + done.stderr
        assert not (self.root / task).exists()  # the task's folder is gone after the push
        (mark,) = [line for line in done.stdout.splitlines() if line.startswith(handoff.LISTING_MARK)]
        return mark.removeprefix(handoff.LISTING_MARK)


@pytest.fixture
def agent(tmp_path: Path, s3: Any) -> Agent:
    return Agent(tmp_path, s3)


def test_the_nodes_listing_is_the_tree_hash_tree_sees_and_its_blobs_are_the_caches(
        agent: Agent, s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "outputs"
    _outputs(src)
    expected = hash_tree(src)
    store = ObjectStore(s3.url(), s3.endpoint)
    sha = agent.push("run1/t1", src)
    tree = handoff.read_listing(store, "handoff/out/run1-t1.listing", sha)
    assert tree == expected
    blobs = {blob_key(e.digest) for e in expected.files if e.link is None}
    assert len(blobs) == 3  # d/f.txt and same.txt share one
    assert blobs <= {k.removeprefix("pipe/") for k in s3.object_keys()}
    with pytest.raises(RemoteError, match="missing or altered"):
        handoff.read_listing(store, "handoff/out/run1-t1.listing", "0" * 64)


def test_a_tree_placed_from_blobs_on_another_node_is_the_same_folder(agent: Agent, s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "outputs"
    _outputs(src)
    expected = hash_tree(src)
    store = ObjectStore(s3.url(), s3.endpoint)
    tree = handoff.read_listing(store, "handoff/out/r-up.listing", agent.push("r/up", src))
    staged = handoff.stage_tree(store, tree)
    done = agent.sh(handoff.fetch_script("r/down", [(0, staged)], [1], f"{os.getuid()}:{os.getgid()}",
                                         agent.prefix, root=str(agent.root)))
    assert done.returncode == 0, done.stderr
    placed = agent.root / "r" / "down" / "m0"
    assert hash_tree(placed) == expected
    assert os.readlink(placed / "dangling") == "/nowhere at all"
    assert sorted(p.name for p in (agent.root / "r" / "down").iterdir()) == ["m0", "m1"]  # no blobs left over


def test_a_corrupt_blob_stops_the_fetch(agent: Agent, s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "outputs"
    src.mkdir()
    (src / "x").write_text("the real content")
    store = ObjectStore(s3.url(), s3.endpoint)
    tree = handoff.read_listing(store, "handoff/out/r-a.listing", agent.push("r/a", src))
    s3.raw.put_object(Bucket=s3.name, Key="pipe/" + blob_key(tree.files[0].digest), Body=b"something else")
    done = agent.sh(handoff.fetch_script("r/b", [(0, handoff.stage_tree(store, tree))], [], "0:0", agent.prefix,
                                         root=str(agent.root)))
    assert done.returncode != 0
    assert not (agent.root / "r" / "b" / "m0" / "x").exists()


def test_a_fifo_in_the_outputs_is_refused_by_name(agent: Agent, tmp_path: Path) -> None:
    src = tmp_path / "outputs"
    src.mkdir()
    os.mkfifo(src / "pipe")
    (agent.root / "r" / "t").mkdir(parents=True)
    os.rename(src, agent.root / "r" / "t" / "m1")
    done = agent.sh(handoff.push_script("r/t", 1, "handoff/out/x.listing", agent.prefix, root=str(agent.root)))
    assert done.returncode == 3
    assert f"{handoff.ERROR_MARK}a fifo, socket or device in /outputs: pipe" in done.stdout


def test_a_tree_the_shell_cannot_place_is_refused_before_any_node_sees_it(s3: Any) -> None:
    from orchestrator.hashing import FileEntry

    store = ObjectStore(s3.url(), s3.endpoint)
    for files in ([FileEntry("a\tb", 1, "ab" * 32, False)],
                  [FileEntry("d", 0, "cd" * 32, False, "/etc"), FileEntry("d/x", 1, "ab" * 32, False)]):
        with pytest.raises(RemoteError, match="cannot hand"):
            handoff.stage_tree(store, TreeDigest("ef" * 32, tuple(files)))
