"""Reflink restores for real (issue 14 #17): a small XFS file system with reflink=1 in a sparse loop file.

Needs root and a loop device (skipped only without them); mkfs.xfs comes from Debian's xfsprogs (scripts/setup.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cache import Cache
from orchestrator.cachekey import Ingredients
from orchestrator.hashing import hash_tree

MIB = 1 << 20


@pytest.fixture
def reflink_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a loop file needs root")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop device")
    if shutil.which("mkfs.xfs") is None:
        pytest.fail("mkfs.xfs is missing: apt-get install xfsprogs (scripts/setup.sh does)")
    image, mount = tmp_path / "xfs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(320 * MIB)  # sparse; mkfs.xfs wants 300 MiB at least
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True, capture_output=True)
    mount.mkdir()
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=False, capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"no usable loop device: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def ingredients() -> Ingredients:
    return Ingredients(image="sha256:" + "a" * 64, command=("true",), entrypoint=None, workdir="/workspace",
                       env={}, params={}, inputs={}, upstream={})


def test_save_and_restore_clone_blobs_so_writing_a_run_file_leaves_the_cache_intact(reflink_fs: Path) -> None:
    out = reflink_fs / "runs" / "run-1" / "train"
    out.mkdir(parents=True)
    data = os.urandom(MIB) * 32
    (out / "model.bin").write_bytes(data)
    os.sync()
    cache = Cache(reflink_fs / "runs" / "cache")
    ing = ingredients()
    before = free_bytes(reflink_fs)
    manifest = cache.save(ing.key(), out, hash_tree(out), ing, "run-1", "train")
    blob = cache.blob_path(manifest.files[0])
    assert blob.stat().st_ino != (out / "model.bin").stat().st_ino, "a clone, not a hard link"
    assert (blob.stat().st_nlink, (out / "model.bin").stat().st_nlink) == (1, 1)

    dest = reflink_fs / "runs" / "run-2" / "train"
    cache.restore(manifest, dest)
    os.sync()
    assert before - free_bytes(reflink_fs) < 8 * MIB, "two 32 MiB clones share the original's blocks"
    restored = dest / "model.bin"
    assert restored.stat().st_ino != blob.stat().st_ino
    assert restored.read_bytes() == data
    assert restored.stat().st_mode & 0o777 == 0o444

    for written in (restored, out / "model.bin"):  # root ignores the read-only mode
        with open(written, "r+b") as f:
            f.write(b"X" * 4096)
    assert blob.read_bytes() == data
    assert cache.lookup(manifest.key).manifest == manifest
    assert cache.verify().problems == ()
