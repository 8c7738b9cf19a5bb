"""The content-addressed stage cache under runs/cache: manifests and blobs; lookup, save, restore, verify, gc.

Knows nothing of Docker, the database or how a stage ran; the key it files entries under is cachekey's.

Layout: blobs/<ab>/<digest> (mode 0444; an executable file is blobs/<ab>/<digest>.x, mode 0555) and
entries/<ab>/<key>.json (a Manifest). Contract: the caller saves only the outputs of a stage that succeeded,
never those of a failed, timed-out or cancelled one; a save is atomic (blobs first, then the manifest written to
a temporary name and renamed), so a crash never leaves a half entry.

Files move between a run folder and the blobs as reflinks (copy-on-write clones: a later write to either copy
leaves the other alone) where the file system has them, else as hard links (one inode: writing to a restored
file as root writes to the blob, and to every run folder linked to it), else as copies. A blob is sealed when
stored: the nanoseconds of its modification time are set to a value derived from its digest (`_tag`). A write
in place moves them, so lookup, with the one stat it already made, tells a blob changed at the same size from
an intact one; `verify` re-hashes to be sure. Manifests say whether their blobs were sealed (`sealed`): entries
of an older pipe, or of a file system that cannot store nanoseconds, are checked by size only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.cachekey import Ingredients
from orchestrator.errors import PipeError
from orchestrator.fsops import Freed, clone, disk_bytes, link_or_copy
from orchestrator.hashing import FileEntry, TreeDigest, hash_file

MANIFEST_FORMAT = 1  # `sealed` was added without a bump: an older pipe ignores it, and its manifests lack it
STALE_TMP_S = 3600  # gc removes temporary files of saves older than this (a crash left them)
_NS = 1_000_000_000
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
    sealed: bool = False  # every blob carried its digest's tag at save: lookup compares the tag too

    @classmethod
    def of(cls, key: str, tree: TreeDigest, ingredients: Ingredients, run_id: str, stage: str,
           sealed: bool = False) -> Manifest:
        """The entry of outputs `tree`, made now."""
        return cls(key=key, digest=tree.digest, files=tree.files, empty_dirs=tree.empty_dirs, ingredients=ingredients,
                   created_at=datetime.now(UTC), run_id=run_id, stage=stage, sealed=sealed)

    @property
    def tree(self) -> TreeDigest:
        return TreeDigest(self.digest, self.files, self.empty_dirs)

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
                "sealed": self.sealed,
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
                sealed=data.get("sealed") is True,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"incomplete cache manifest: {e}") from e


@dataclass(frozen=True)
class Lookup:
    """The answer of Cache.lookup: a hit, a plain miss, or a damaged entry (a miss with a problem to warn of)."""

    manifest: Manifest | None
    problem: str | None = None  # "cache entry 1a2b3c4d5e6f is damaged (...)"; the caller adds "; re-running"
    remote: str | None = None  # a hit found in this remote (its URL), not in the local cache
    fetched: Fetched | None = None  # what a remote hit brought into the local cache


@dataclass(frozen=True)
class Fetched:
    """What bringing an entry from a remote cost: blobs and bytes downloaded, and the wall time it took."""

    files: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class GcReport:
    entries_removed: int
    entries_kept: int
    blobs_removed: int
    blob_bytes: int  # the removed blobs' sizes, whether or not a link elsewhere keeps them on disk
    bytes_freed: int  # what the disk gets back (Freed.bytes; with a shared Freed, everything it counted)
    bytes_still_linked: int  # blocks of removed blobs that links outside the removal keep (run folders)
    removed_keys: tuple[str, ...] = ()  # sorted; what --dry-run shows


@dataclass(frozen=True)
class Problem:
    """One finding of verify. kind: corrupt_blob, unreadable_manifest, unsafe_manifest, missing_blob,
    damaged_blob (an entry's blob is corrupt or of the wrong size) or moved_tag (intact, but touched)."""

    kind: str
    message: str
    key: str | None = None
    blob: str | None = None  # the blob's file name: digest, plus .x for an executable


@dataclass(frozen=True)
class VerifyReport:
    blobs_checked: int
    bytes_checked: int
    entries_checked: int
    problems: tuple[Problem, ...]
    repaired: bool
    blobs_removed: int = 0  # corrupt blobs deleted by repair
    entries_removed: int = 0  # entries deleted by repair: each is a miss from now on, and re-runs
    blobs_resealed: int = 0  # intact blobs whose tag repair set again


class Cache:
    """runs/cache: blobs by content digest plus one manifest per key. See the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._entries = root / "entries"
        self._clones = True  # until the file system refuses one: then hard links, without asking again

    def lookup(self, key: str) -> Lookup:
        """A hit only when the manifest parses and every blob exists with its size and, for a sealed entry, its
        tag (one stat per blob, no read)."""
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
                st = self.blob_path(entry).stat()
            except OSError:
                return Lookup(None, self._damaged(key, f"blob of {entry.path} is missing"))
            if st.st_size != entry.size:
                return Lookup(
                    None, self._damaged(key, f"blob of {entry.path} has {st.st_size} bytes, not {entry.size}")
                )
            if manifest.sealed and st.st_mtime_ns % _NS != _tag(entry.digest):
                return Lookup(None, self._damaged(
                    key, f"blob of {entry.path} was modified after it was saved; `pipe cache verify` checks it"))
        return Lookup(manifest)

    def save(
        self, key: str, outputs_dir: Path, tree: TreeDigest, ingredients: Ingredients, run_id: str, stage: str
    ) -> Manifest:
        """Stores `tree` (hash_tree of outputs_dir) under `key`; only ever for a stage that succeeded.

        Each file is cloned into the blob store (a reflink), or hard-linked and made read-only (so the run's own
        output file becomes read-only too), or copied when neither is possible (another device, another owner),
        then sealed; a blob already present with its size and tag is reused, any other is replaced by the fresh
        file. Symlinks are recorded, never followed. The manifest appears last and atomically. Raises PipeError
        naming the file when the disk refuses.
        """
        self._entry_path(key)  # ValueError for a malformed key, before any blob is stored
        try:
            sealed = True
            for entry in tree.files:
                if entry.link is None:
                    sealed = self._store_blob(outputs_dir / entry.path, entry) and sealed
            manifest = Manifest.of(key, tree, ingredients, run_id, stage, sealed)
            self._write_entry(manifest)
        except OSError as e:
            raise PipeError(f"cannot save the outputs of {stage} to the cache in {self.root}: {e}") from e
        return manifest

    def adopt(self, manifest: Manifest, fresh: frozenset[Path] = frozenset()) -> Manifest:
        """Files `manifest` (from elsewhere: a remote) whose blobs another module put at blob_path(entry).

        Each blob must be there with its size. The ones in `fresh` were just verified against their digest by
        whoever put them there (remote.fetch_entry does): they are sealed. Any other blob must carry its tag
        already, else it is hashed again (an older blob, or one written to in place); a blob that does not hash
        to its digest is removed and PipeError raised. The manifest is written like save's (atomic), sealed
        when every blob is; the filed Manifest is returned."""
        key = manifest.key
        sealed = True
        try:
            for entry in manifest.files:
                if entry.link is not None:
                    continue
                blob = self.blob_path(entry)
                st = blob.stat()
                if st.st_size != entry.size:
                    raise PipeError(self._damaged(key, f"blob of {entry.path} has {st.st_size} bytes, not {entry.size}"))
                tag = _tag(entry.digest)
                if blob not in fresh and st.st_mtime_ns % _NS != tag and hash_file(blob) != entry.digest:
                    blob.unlink()
                    raise PipeError(self._damaged(key, f"blob of {entry.path} is corrupt"))
                sealed = (st.st_mtime_ns % _NS == tag or _seal(blob, tag)) and sealed
            filed = replace(manifest, sealed=sealed)
            self._write_entry(filed)
        except OSError as e:
            raise PipeError(f"cannot add cache entry {key[:12]} of {manifest.stage} to {self.root}: {e}") from e
        return filed

    def restore(self, manifest: Manifest, dest: Path) -> None:
        """Materialises the outputs in `dest` (absent or empty) without copying bytes where possible.

        Files become reflink clones of the read-only blobs, or hard links to them where the file system has no
        reflinks, or copies when a link is impossible; symlinks and empty folders are recreated. On PipeError,
        dest may hold part of the outputs: the caller discards it.
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
                    self._place(self.blob_path(entry), target, _blob_mode(entry))
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

    def verify(self, repair: bool = False) -> VerifyReport:
        """Re-hashes every blob and checks every manifest against them. `repair` deletes corrupt blobs and the
        entries that are damaged or need a missing or corrupt blob (each becomes a miss and re-runs), and seals
        again the intact blobs whose tag moved (a `touch`)."""
        problems: list[Problem] = []
        intact: dict[str, os.stat_result] = {}  # blob file name -> its stat
        checked = checked_bytes = 0
        for blob in self._blob_files():
            digest = blob.name.removesuffix(".x")
            actual = hash_file(blob)
            checked, checked_bytes = checked + 1, checked_bytes + blob.stat().st_size
            if actual == digest:
                intact[blob.name] = blob.stat()
                continue
            problems.append(Problem("corrupt_blob", f"blob {digest[:12]} is corrupt (its content hashes to "
                                    f"{actual[:12]})", blob=blob.name))
            if repair:
                blob.unlink()
        entries = entries_removed = 0
        reseal: set[str] = set()
        for path in self._entry_files():
            key = path.name.removesuffix(".json")
            entries += 1
            found = self._check_entry(path, key, intact)
            problems += found
            reseal |= {p.blob for p in found if p.kind == "moved_tag" and p.blob}
            if repair and any(p.kind != "moved_tag" for p in found):
                path.unlink()
                entries_removed += 1
        resealed = 0
        for name in sorted(reseal) if repair else ():
            blob = self._blobs / name[:2] / name
            resealed += _seal(blob, _tag(name.removesuffix(".x")))
        corrupt = sum(p.kind == "corrupt_blob" for p in problems)
        return VerifyReport(checked, checked_bytes, entries, tuple(problems), repair,
                            corrupt if repair else 0, entries_removed, resealed)

    def _check_entry(self, path: Path, key: str, intact: dict[str, os.stat_result]) -> list[Problem]:
        try:
            manifest = Manifest.from_json(path.read_bytes())
        except (OSError, ValueError):
            return [Problem("unreadable_manifest", self._damaged(key, "unreadable manifest"), key=key)]
        if manifest.key != key or any(_leaves_folder(f.path) for f in manifest.files):
            return [Problem("unsafe_manifest", self._damaged(key, "manifest of another key or a path that "
                                                             "leaves the outputs folder"), key=key)]
        found = []
        for entry in manifest.files:
            name = self.blob_path(entry).name
            st = intact.get(name)
            if entry.link is not None:
                continue
            if st is None or st.st_size != entry.size:
                kind = "damaged_blob" if st is not None or self.blob_path(entry).exists() else "missing_blob"
                found.append(Problem(kind, self._damaged(key, f"blob of {entry.path} is missing or corrupt"),
                                     key=key, blob=name))
            elif manifest.sealed and st.st_mtime_ns % _NS != _tag(entry.digest):
                found.append(Problem("moved_tag", self._damaged(
                    key, f"blob of {entry.path} is intact but was touched; --repair seals it again"),
                    key=key, blob=name))
        return found

    def gc(self, keep: set[str], dry_run: bool = False, freed: Freed | None = None) -> GcReport:
        """Removes the entries whose key is not in `keep`, then every blob no remaining manifest references,
        and temporary files that a crashed save left. Run it under the pipeline's lock: a save in progress
        has blobs that no manifest references yet. What the removals free is counted in `freed` (pass the one
        that also counts run folders removed in the same collection, so a block is counted once)."""
        freed = freed if freed is not None else Freed()
        removed_keys, kept = [], 0
        referenced: set[str] = set()
        for path in self._entry_files():
            key = path.name.removesuffix(".json")
            if key not in keep:
                removed_keys.append(key)
                freed.note(path.lstat())
                if not dry_run:
                    path.unlink()
                continue
            kept += 1
            try:
                manifest = Manifest.from_json(path.read_bytes())
            except (OSError, ValueError):
                continue  # damaged: its blobs cannot be known, and lookup already treats it as a miss
            referenced.update(self.blob_path(e).name for e in manifest.files if e.link is None)
        blobs_removed = blob_bytes = 0
        removed = Freed()  # the blobs alone, for bytes_still_linked
        for blob in self._blob_files():
            if blob.name not in referenced:
                st = blob.lstat()
                blobs_removed, blob_bytes = blobs_removed + 1, blob_bytes + st.st_size
                freed.note(st)
                removed.note(st)
                if not dry_run:
                    blob.unlink()
        if not dry_run:
            self._remove_stale_tmp()
        return GcReport(len(removed_keys), kept, blobs_removed, blob_bytes, freed.bytes, removed.still_linked,
                        tuple(sorted(removed_keys)))

    def disk_bytes(self, seen: set[tuple[int, int]] | None = None) -> int:
        """Blocks the cache holds on disk, each inode once; `seen` collects the inodes (for runs' share)."""
        return disk_bytes(self.root, seen if seen is not None else set())

    def blob_path(self, entry: FileEntry) -> Path:
        suffix = ".x" if entry.executable else ""
        return self._blobs / entry.digest[:2] / f"{entry.digest}{suffix}"

    def _entry_path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self._entries / key[:2] / f"{key}.json"

    def _write_entry(self, manifest: Manifest) -> None:
        """The manifest under its key, atomically: a temporary name in the same folder, fsync, rename."""
        entry_path = self._entry_path(manifest.key)
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

    def _store_blob(self, source: Path, entry: FileEntry) -> bool:
        """The blob of `entry`, from `source` unless an intact one is there; True when it is sealed."""
        blob = self.blob_path(entry)
        tag = _tag(entry.digest)
        try:
            st = blob.stat()
            if st.st_size == entry.size and st.st_mtime_ns % _NS == tag:
                return True  # dedupe by content; its tag says nothing wrote to it since it was stored
        except FileNotFoundError:
            blob.parent.mkdir(parents=True, exist_ok=True)
        # absent, short, written to since it was stored, or stored unsealed by an older pipe: the fresh file wins
        tmp = blob.with_name(f".{blob.name}.{secrets.token_hex(4)}.tmp")
        try:
            self._place(source, tmp, _blob_mode(entry), chmod_link=True)
            sealed = _seal(tmp, tag)
            os.replace(tmp, blob)
        finally:
            tmp.unlink(missing_ok=True)
        return sealed

    def _place(self, source: Path, target: Path, mode: int, chmod_link: bool = False) -> None:
        """target becomes a reflink clone of source, else a hard link to it, else a copy (fsops.link_or_copy).
        Blobs and run folders share the state dir's file system: after one refusal this Cache stops asking."""
        if self._clones:
            if clone(source, target, mode):
                return
            self._clones = False
        link_or_copy(source, target, mode, chmod_link)

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


def _tag(digest: str) -> int:
    """The nanoseconds a sealed blob's modification time carries: a write in place sets them to the clock's."""
    return int(digest[:8], 16) % _NS


def _seal(path: Path, tag: int) -> bool:
    """Sets the nanoseconds of path's mtime to `tag` (its seconds stay); False where the file system keeps
    coarser times or the file is not ours to touch."""
    try:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - st.st_mtime_ns % _NS + tag))
        return path.stat().st_mtime_ns % _NS == tag
    except PermissionError:
        return False
