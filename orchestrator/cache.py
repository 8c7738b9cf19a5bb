"""The content-addressed stage cache under runs/cache: manifests and blobs; lookup, save, restore, verify, gc.

Knows nothing of Docker, the database or how a stage ran; the key it files entries under is cachekey's.

Layout: blobs/<ab>/<digest> (mode 0444; an executable file is blobs/<ab>/<digest>.x, mode 0555) and
entries/<ab>/<key>.json (a Manifest). Contract: the caller saves only the outputs of a stage that succeeded,
never those of a failed, timed-out or cancelled one; a save is atomic (blobs first, then the manifest written to
a temporary name and renamed), so a crash never leaves a half entry.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.cachekey import Ingredients
from orchestrator.errors import PipeError
from orchestrator.hashing import FileEntry, TreeDigest, hash_file

MANIFEST_FORMAT = 1
STALE_TMP_S = 3600  # gc removes temporary files of saves older than this (a crash left them)
_KEY = re.compile(r"^[0-9a-f]{16,128}$")


@dataclass(frozen=True)
class Manifest:
    """A cache entry: the outputs of one successful stage run, by content."""

    key: str
    digest: str  # the outputs folder's tree digest (hash_tree): what downstream keys see
    files: tuple[FileEntry, ...]
    ingredients: Ingredients
    created_at: datetime
    run_id: str
    stage: str
    empty_dirs: tuple[str, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "key": self.key,
                "digest": self.digest,
                "stage": self.stage,
                "run_id": self.run_id,
                "created_at": self.created_at.isoformat(),
                "files": [asdict(entry) for entry in self.files],
                "empty_dirs": list(self.empty_dirs),
                "ingredients": asdict(self.ingredients),
            },
            sort_keys=True,
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """ValueError (json.JSONDecodeError included) when the text is not a manifest this pipe can read."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a cache manifest of format {MANIFEST_FORMAT}")
        try:
            return cls(
                key=data["key"],
                digest=data["digest"],
                stage=data["stage"],
                run_id=data["run_id"],
                created_at=datetime.fromisoformat(data["created_at"]),
                files=tuple(FileEntry(**entry) for entry in data["files"]),
                empty_dirs=tuple(data["empty_dirs"]),
                ingredients=Ingredients.from_dict(data["ingredients"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"incomplete cache manifest: {e}") from e


@dataclass(frozen=True)
class Lookup:
    """The answer of Cache.lookup: a hit, a plain miss, or a damaged entry (a miss with a problem to warn of)."""

    manifest: Manifest | None
    problem: str | None = None  # "cache entry 1a2b3c4d5e6f is damaged (...)"; the caller adds "; re-running"


@dataclass(frozen=True)
class GcReport:
    entries_removed: int
    entries_kept: int
    blobs_removed: int
    bytes_removed: int  # blob sizes; a run folder still hard-linking a blob keeps its bytes on disk
    removed_keys: tuple[str, ...] = ()  # sorted; what --dry-run shows


class Cache:
    """runs/cache: blobs by content digest plus one manifest per key. See the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._entries = root / "entries"

    def lookup(self, key: str) -> Lookup:
        """A hit only when the manifest parses and every blob exists with its size (stat only, no read)."""
        path = self._entry_path(key)
        try:
            manifest = Manifest.from_json(path.read_bytes())
        except FileNotFoundError:
            return Lookup(None)
        except (OSError, ValueError):
            return Lookup(None, self._damaged(key, "unreadable manifest"))
        if manifest.key != key:
            return Lookup(None, self._damaged(key, "manifest of another key"))
        if any(_leaves_folder(p) for p in (*manifest.empty_dirs, *(e.path for e in manifest.files))):
            return Lookup(None, self._damaged(key, "a path leaves the outputs folder"))
        for entry in manifest.files:
            if entry.link is not None:
                continue
            try:
                size = self.blob_path(entry).stat().st_size
            except OSError:
                return Lookup(None, self._damaged(key, f"blob of {entry.path} is missing"))
            if size != entry.size:
                return Lookup(
                    None, self._damaged(key, f"blob of {entry.path} has {size} bytes, not {entry.size}")
                )
        return Lookup(manifest)

    def save(
        self, key: str, outputs_dir: Path, tree: TreeDigest, ingredients: Ingredients, run_id: str, stage: str
    ) -> Manifest:
        """Stores `tree` (hash_tree of outputs_dir) under `key`; only ever for a stage that succeeded.

        Each file is hard-linked into the blob store and made read-only (so the run's own output file becomes
        read-only too), or copied when a link is impossible (another device, another owner); a blob already
        present with its size is reused. Symlinks are recorded, never followed. The manifest appears last and
        atomically. Raises PipeError naming the file when the disk refuses.
        """
        entry_path = self._entry_path(key)
        try:
            for entry in tree.files:
                if entry.link is None:
                    self._store_blob(outputs_dir / entry.path, entry)
            manifest = Manifest(
                key=key,
                digest=tree.digest,
                files=tree.files,
                empty_dirs=tree.empty_dirs,
                ingredients=ingredients,
                created_at=datetime.now(UTC),
                run_id=run_id,
                stage=stage,
            )
            entry_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry_path.with_name(f".{entry_path.name}.{secrets.token_hex(4)}.tmp")
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(manifest.to_json())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, entry_path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise PipeError(f"cannot save the outputs of {stage} to the cache in {self.root}: {e}") from e
        return manifest

    def restore(self, manifest: Manifest, dest: Path) -> None:
        """Materialises the outputs in `dest` (absent or empty) without copying bytes where possible.

        Files become hard links to the read-only blobs, or copies (reflinked where the filesystem can) when a
        link is impossible; symlinks and empty folders are recreated. On PipeError, dest may hold part of the
        outputs: the caller discards it.
        """
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for folder in manifest.empty_dirs:
                (dest / folder).mkdir(parents=True, exist_ok=True)
            for entry in manifest.files:
                target = dest / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                if entry.link is not None:
                    os.symlink(entry.link, target)
                else:
                    _link_or_copy(self.blob_path(entry), target, _blob_mode(entry))
        except OSError as e:
            raise PipeError(
                f"cannot restore cache entry {manifest.key[:12]} of {manifest.stage} into {dest}: {e}"
            ) from e

    def entries(self) -> Iterator[Manifest]:
        """Every readable manifest, in no particular order; damaged ones are skipped (verify reports them)."""
        for path in self._entry_files():
            try:
                yield Manifest.from_json(path.read_bytes())
            except (OSError, ValueError):
                continue

    def verify(self, repair: bool = False) -> list[str]:
        """Re-hashes every blob and checks every manifest; one line per problem. `repair` deletes bad blobs and
        unreadable manifests, so the entries that need them miss at lookup and re-run."""
        problems = []
        blob_sizes: dict[str, int] = {}
        for blob in self._blob_files():
            digest = blob.name.removesuffix(".x")
            actual = hash_file(blob)
            if actual == digest:
                blob_sizes[blob.name] = blob.stat().st_size
                continue
            problems.append(f"blob {digest[:12]} is corrupt (its content hashes to {actual[:12]})")
            if repair:
                blob.unlink()
        for path in self._entry_files():
            key = path.name.removesuffix(".json")
            try:
                manifest = Manifest.from_json(path.read_bytes())
            except (OSError, ValueError):
                problems.append(self._damaged(key, "unreadable manifest"))
                if repair:
                    path.unlink()
                continue
            for entry in manifest.files:
                name = self.blob_path(entry).name
                if entry.link is None and blob_sizes.get(name) != entry.size:
                    problems.append(self._damaged(key, f"blob of {entry.path} is missing or corrupt"))
        return problems

    def gc(self, keep: set[str], dry_run: bool = False) -> GcReport:
        """Removes the entries whose key is not in `keep`, then every blob no remaining manifest references,
        and temporary files that a crashed save left. Run it under the pipeline's lock: a save in progress
        has blobs that no manifest references yet."""
        removed_keys, kept = [], 0
        referenced: set[str] = set()
        for path in self._entry_files():
            key = path.name.removesuffix(".json")
            if key not in keep:
                removed_keys.append(key)
                if not dry_run:
                    path.unlink()
                continue
            kept += 1
            try:
                manifest = Manifest.from_json(path.read_bytes())
            except (OSError, ValueError):
                continue  # damaged: its blobs cannot be known, and lookup already treats it as a miss
            referenced.update(self.blob_path(e).name for e in manifest.files if e.link is None)
        blobs_removed = bytes_removed = 0
        for blob in self._blob_files():
            if blob.name not in referenced:
                blobs_removed += 1
                bytes_removed += blob.stat().st_size
                if not dry_run:
                    blob.unlink()
        if not dry_run:
            self._remove_stale_tmp()
        return GcReport(len(removed_keys), kept, blobs_removed, bytes_removed, tuple(sorted(removed_keys)))

    def blob_path(self, entry: FileEntry) -> Path:
        suffix = ".x" if entry.executable else ""
        return self._blobs / entry.digest[:2] / f"{entry.digest}{suffix}"

    def _entry_path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self._entries / key[:2] / f"{key}.json"

    def _store_blob(self, source: Path, entry: FileEntry) -> None:
        blob = self.blob_path(entry)
        try:
            if blob.stat().st_size == entry.size:
                return  # dedupe by content; a short blob left by damage is replaced below
        except FileNotFoundError:
            blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f".{blob.name}.{secrets.token_hex(4)}.tmp")
        try:
            _link_or_copy(source, tmp, _blob_mode(entry), chmod_link=True)
            os.replace(tmp, blob)
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_stale_tmp(self) -> None:
        for folder in (self._blobs, self._entries):
            for tmp in folder.glob("*/.*.tmp"):
                try:  # a link updates ctime, so a fresh blob link looks fresh even if its content is old
                    if time.time() - tmp.lstat().st_ctime > STALE_TMP_S:
                        tmp.unlink()
                except FileNotFoundError:
                    continue

    def _entry_files(self) -> Iterator[Path]:
        return (p for p in self._entries.glob("*/*.json") if not p.name.startswith("."))

    def _blob_files(self) -> Iterator[Path]:
        return (p for p in self._blobs.glob("*/*") if not p.name.startswith("."))

    @staticmethod
    def _damaged(key: str, why: str) -> str:
        return f"cache entry {key[:12]} is damaged ({why})"


def _leaves_folder(path: str) -> bool:
    return path.startswith("/") or ".." in path.split("/")


def _blob_mode(entry: FileEntry) -> int:
    return 0o555 if entry.executable else 0o444


def _link_or_copy(source: Path, target: Path, mode: int, chmod_link: bool = False) -> None:
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
