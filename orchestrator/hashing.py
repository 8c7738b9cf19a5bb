"""Content digests: canonical-JSON values, files, and folders as a Merkle list, with a stat-keyed memo.

Knows nothing of stages, the cache or the database: the memo that outlives a run is the store's `HashMemo`.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from blake3 import blake3

from orchestrator.errors import PipeError

CHUNK_BYTES = 1 << 20
MMAP_MIN_BYTES = 4 << 20  # from here on, update_mmap with blake3's own threads beats chunked reads
RACY_NS = 2_000_000_000  # a file modified this close to the hash is not memoised ("racy git"; FAT has 2 s)

StatKey = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


class HashMemo(Protocol):
    """Remembers a file's digest against its StatKey, so an unchanged file is never read again."""

    def get(self, path: str, key: StatKey) -> str | None: ...

    def put(self, path: str, key: StatKey, digest: str) -> None: ...

    def flush(self) -> None: ...


class DictMemo:
    """An in-memory HashMemo, for tests and for runs without a database."""

    def __init__(self) -> None:
        self.digests: dict[tuple[str, StatKey], str] = {}

    def get(self, path: str, key: StatKey) -> str | None:
        return self.digests.get((path, key))

    def put(self, path: str, key: StatKey, digest: str) -> None:
        self.digests[(path, key)] = digest

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class FileEntry:
    """One file or symlink of a tree. A symlink has link=its target text and is never followed."""

    path: str  # relative to the tree's root, posix separators
    size: int  # 0 for a symlink
    digest: str
    executable: bool
    link: str | None = None


@dataclass(frozen=True)
class TreeDigest:
    """A tree's digest and its entries sorted by path; empty_dirs lists the folders holding nothing."""

    digest: str
    files: tuple[FileEntry, ...]
    empty_dirs: tuple[str, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)


def canonical_json(value: object) -> str:
    """The value as JSON with sorted keys and compact separators; tuples as lists, 10 and 10.0 as written.

    ValueError for NaN or an infinity, which JSON cannot hold.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_hash(value: object) -> str:
    """blake3 hex of canonical_json(value)."""
    return hash_bytes(canonical_json(value).encode("utf-8", "surrogatepass"))  # undecodable file names survive


def hash_bytes(data: bytes) -> str:
    return blake3(data).hexdigest()


def hash_link(target: str) -> str:
    """The digest of a symlink: its target text, never what it points at."""
    return hash_bytes(b"link:" + os.fsencode(target))


def hash_file(path: Path) -> str:
    """blake3 hex of a file's content (a symlink given here is followed: the caller named it)."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise _read_error(path, e) from e
    return _hash_content(str(path), size)


def hash_tree(path: Path, memo: HashMemo | None = None, workers: int = 1) -> TreeDigest:
    """The digest of a file (its content) or of a folder (a Merkle list of its entries).

    A folder's digest is canonical_hash({"files": [[path, digest, executable, link], ...], "empty_dirs": [...]})
    over every entry sorted by path, so a rename, a content change, an exec bit or a symlink target change it
    and an mtime-only touch does not. The root itself is followed (Docker mounts a symlinked input's target);
    below it symlinks are entries, never followed. A file whose StatKey is in `memo` is not read; new digests
    are put into `memo` (the caller flushes). Files of 4 MiB and more are hashed by blake3's own threads; small
    files are read one after the other by default: on 2 cores, 4 threads were 1.4-1.9x slower over 10,000 files
    of 100 KiB (bench/), the threads contending for the interpreter lock. `workers` > 1 spreads them on threads.
    Raises PipeError naming the path when something cannot be read or is a fifo, socket or device.
    """
    started_ns = time.time_ns()
    root = os.path.abspath(path)
    try:
        st = os.stat(root)
    except OSError as e:
        raise _read_error(root, e) from e
    if stat.S_ISREG(st.st_mode):
        (entry,) = _hash_files([(os.path.basename(root), root, st)], memo, workers, started_ns)
        return TreeDigest(entry.digest, (entry,))
    if not stat.S_ISDIR(st.st_mode):
        raise _special_error(root)
    regular, links, empty_dirs = _walk(root)
    return tree_of([*_hash_files(regular, memo, workers, started_ns), *links], empty_dirs)


def tree_of(files: Iterable[FileEntry], empty_dirs: Iterable[str]) -> TreeDigest:
    """A folder's TreeDigest from its entries, in any order: what hash_tree computes once it has read the files,
    and what a cluster executor's node listing (digests made where the bytes are) is turned into."""
    entries = sorted(files, key=lambda e: e.path)
    rows = [[e.path, e.digest, e.executable, e.link] for e in entries]
    dirs = sorted(empty_dirs)
    return TreeDigest(canonical_hash({"files": rows, "empty_dirs": dirs}), tuple(entries), tuple(dirs))


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_Regular = tuple[str, str, os.stat_result]  # relative path, absolute path, lstat


def _walk(root: str) -> tuple[list[_Regular], list[FileEntry], list[str]]:
    """Stats every entry under root (one lstat each, no content read) without following symlinks."""
    regular: list[_Regular] = []
    links: list[FileEntry] = []
    empty_dirs: list[str] = []
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        empty = True
        try:
            with os.scandir(abs_dir) as it:
                for entry in it:
                    empty = False
                    rel = rel_dir + entry.name
                    if entry.is_symlink():
                        target = os.readlink(entry.path)
                        links.append(FileEntry(rel, 0, hash_link(target), False, target))
                    elif entry.is_dir(follow_symlinks=False):
                        stack.append((rel + "/", entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        regular.append((rel, entry.path, entry.stat(follow_symlinks=False)))
                    else:
                        raise _special_error(entry.path)
        except OSError as e:
            raise _read_error(abs_dir, e) from e
        if empty and rel_dir:
            empty_dirs.append(rel_dir[:-1])
    return regular, links, empty_dirs


def _hash_files(
    items: list[_Regular], memo: HashMemo | None, workers: int, started_ns: int
) -> list[FileEntry]:
    known = [memo.get(abs_path, stat_key(st)) if memo else None for _, abs_path, st in items]
    todo = [i for i, digest in enumerate(known) if digest is None]
    if len(todo) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            fresh = dict(zip(todo, pool.map(lambda i: _hash_content(items[i][1], items[i][2].st_size), todo)))
    else:
        fresh = {i: _hash_content(items[i][1], items[i][2].st_size) for i in todo}
    if memo is not None:
        for i, digest in fresh.items():
            _, abs_path, st = items[i]
            if st.st_mtime_ns < started_ns - RACY_NS:
                memo.put(abs_path, stat_key(st), digest)
    return [
        FileEntry(rel, st.st_size, fresh[i] if digest is None else digest, bool(st.st_mode & stat.S_IXUSR))
        for i, ((rel, _, st), digest) in enumerate(zip(items, known, strict=True))
    ]


def _hash_content(path: str, size: int) -> str:
    try:
        if size >= MMAP_MIN_BYTES:
            return blake3(max_threads=blake3.AUTO).update_mmap(path).hexdigest()
        hasher = blake3()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                hasher.update(chunk)
        return hasher.hexdigest()
    except OSError as e:
        raise _read_error(path, e) from e


def _read_error(path: str | Path, error: OSError) -> PipeError:
    return PipeError(f"cannot read {path}: {error.strerror or error}; check that it exists and is readable")


def _special_error(path: str) -> PipeError:
    return PipeError(
        f"{path} is a fifo, socket or device, which pipe cannot hash; remove it or declare a file"
    )
