"""File-system mechanics of the cache and of gc: reflink clones with their fallbacks, what a removal frees, disk
use. Knows nothing of manifests, runs or history.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path

FICLONE = getattr(fcntl, "FICLONE", 0x40049409)  # _IOW(0x94, 9, int); the fcntl constant exists from 3.12
CLONE_REFUSED = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS)


class Freed:
    """What removing paths frees, counted before each removal: an inode's blocks count once, when its last link
    goes (st_nlink against the links noted, by (st_dev, st_ino)); a folder's own blocks count as it goes.

    A reflink clone is its own inode whose blocks stay shared with the original until one is written: removing
    it counts its blocks although the original keeps them (no extent-level accounting here).
    """

    def __init__(self) -> None:
        self._inodes: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [links noted, st_nlink, bytes]

    def note(self, st: os.stat_result) -> None:
        found = self._inodes.get((st.st_dev, st.st_ino))
        if found is None:
            links = 1 if stat.S_ISDIR(st.st_mode) else st.st_nlink
            self._inodes[(st.st_dev, st.st_ino)] = [1, links, st.st_blocks * 512]
        else:
            found[0] += 1

    @property
    def bytes(self) -> int:
        return sum(size for noted, links, size in self._inodes.values() if noted >= links)

    @property
    def still_linked(self) -> int:
        return sum(size for noted, links, size in self._inodes.values() if noted < links)


def clone(source: Path, target: Path, mode: int) -> bool:
    """Creates target as a reflink of source (ioctl FICLONE: btrfs, XFS with reflink=1, bcachefs, ...), with
    `mode`. False, leaving no target, where the file system refuses (EOPNOTSUPP, EXDEV, EINVAL, ENOTTY)."""
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(fd, FICLONE, src.fileno())
            os.fchmod(fd, mode)
        except OSError as e:
            os.close(fd)
            target.unlink(missing_ok=True)
            if e.errno in CLONE_REFUSED:
                return False
            raise
        os.close(fd)
    return True


def link_or_copy(source: Path, target: Path, mode: int, chmod_link: bool = False) -> None:
    """Hard-links source to target, or copies it (reflinked where possible) when a link is refused.

    With chmod_link the linked inode itself gets `mode`; a copy always gets it. A link fails across devices
    (EXDEV), for a file of another owner under fs.protected_hardlinks (EPERM), or at the link limit (EMLINK).
    """
    try:
        os.link(source, target)
        if chmod_link:
            os.chmod(target, mode)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
            raise
        target.unlink(missing_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        _copy_range(src.fileno(), dst.fileno(), os.fstat(src.fileno()).st_size)
    os.chmod(target, mode)


def _copy_range(src: int, dst: int, size: int) -> None:
    """copy_file_range shares extents on btrfs and XFS (a reflink) and copies in the kernel elsewhere."""
    copied = 0
    try:
        while copied < size and (n := os.copy_file_range(src, dst, size - copied)):
            copied += n
    except OSError as e:
        if copied or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        with os.fdopen(src, "rb", closefd=False) as reader, os.fdopen(dst, "wb", closefd=False) as writer:
            shutil.copyfileobj(reader, writer)


def disk_bytes(root: Path, seen: set[tuple[int, int]]) -> int:
    """Blocks under root (not following symlinks), each inode once across calls sharing `seen`."""
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue  # removed while walking
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total
