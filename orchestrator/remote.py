"""Cache entries in an object store, by content: the remote layout, push and fetch. No S3 library here.

Layout under the store's prefix (remote's own, independent of the local cache's folders):

    blobs/<d[:2]>/<digest>        one object per distinct file content, named by its blake3 digest
    manifests/<key>.json          the local cache's Manifest JSON (cache.Manifest.to_json), unchanged

An executable file and a plain one of the same content share a blob: the exec bit is in the manifest. A push
uploads the missing blobs first and the manifest last, with put_if_absent, so a manifest is visible only once
every blob it names exists, and two machines pushing the same key leave one whole manifest. A fetch reads the
manifest, downloads every blob it lacks locally (verified by digest), and returns the manifest only when all
arrived: a missing or corrupt blob is a RemoteMiss (a warning and a miss for the caller), never a partial entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from orchestrator.cache import Manifest
from orchestrator.errors import RemoteError
from orchestrator.hashing import FileEntry, TreeDigest
from orchestrator.objectstore import TRANSFER_WORKERS, DigestMismatch, ObjectMissing, ObjectStore, bounded_map

BLOBS = "blobs/"
MANIFESTS = "manifests/"


class RemoteMiss(RemoteError):
    """A remote entry that cannot be used (damaged manifest, missing or corrupt blob): warn, then treat as a miss."""


@dataclass(frozen=True)
class Transfer:
    """What a push or fetch moved: objects and bytes sent or received, and the ones already in place."""

    files: int = 0
    bytes: int = 0
    skipped: int = 0
    manifest_written: bool = False
    paths: tuple[Path, ...] = ()  # fetch: the destinations downloaded (and verified) by this call


def blob_key(digest: str) -> str:
    if len(digest) < 3 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a content digest: {digest!r}")
    return f"{BLOBS}{digest[:2]}/{digest}"


def manifest_key(key: str) -> str:
    if not key or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key: {key!r}")
    return f"{MANIFESTS}{key}.json"


def blobs_of(manifest: Manifest | TreeDigest) -> dict[str, FileEntry]:
    """One entry per distinct content digest among the manifest's files (symlinks have no blob)."""
    return {entry.digest: entry for entry in manifest.files if entry.link is None}


def push_entry(
    store: ObjectStore,
    manifest: Manifest,
    blob_path_of: Callable[[FileEntry], Path],
    workers: int = TRANSFER_WORKERS,
    on_file: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> Transfer:
    """Uploads the entry's blobs that the remote lacks (read from blob_path_of(entry)), then its manifest.

    A blob already on the remote is not sent again (an object there is whole: a PUT is atomic and a multipart
    upload appears only when completed; corruption on the server is caught by the reader's digest check); the
    manifest goes last, and only if no manifest of this key is there yet. `on_plan(files, bytes)` once the
    blobs to send are known, `on_file(size)` after each. RemoteError when a transfer fails: blobs sent so far stay (they are
    content-addressed and harmless), and no manifest names them yet.
    """
    blobs = [(blob_key(digest), entry) for digest, entry in blobs_of(manifest).items()]
    present = bounded_map(lambda item: store.exists(item[0]), blobs, workers)  # a HEAD each, in parallel
    todo = [(key, blob_path_of(entry), entry.size) for (key, entry), there in zip(blobs, present) if not there]
    skipped = len(blobs) - len(todo)
    if on_plan is not None:
        on_plan(len(todo), sum(size for _, _, size in todo))
    store.put_many([(key, path) for key, path, _ in todo], workers, on_file)
    written = store.put_if_absent(manifest_key(manifest.key), manifest.to_json().encode("utf-8"))
    return Transfer(len(todo), sum(size for _, _, size in todo), skipped, written)


def fetch_entry(
    store: ObjectStore,
    key: str,
    blob_dest_of: Callable[[FileEntry], Path],
    workers: int = TRANSFER_WORKERS,
    on_file: Callable[[int], None] | None = None,
) -> tuple[Manifest, Transfer] | None:
    """The remote manifest of `key` with every blob it names in place at blob_dest_of(entry), or None when the
    remote has no manifest for the key: read_manifest, then fetch_blobs (their docstrings say what can fail)."""
    manifest = read_manifest(store, key)
    if manifest is None:
        return None
    return manifest, fetch_blobs(store, manifest, blob_dest_of, workers, on_file)


def read_manifest(store: ObjectStore, key: str) -> Manifest | None:
    """The remote manifest of `key` (one GET), or None when there is none. RemoteMiss when it is unreadable,
    names another key or has a path leaving the outputs folder; other RemoteErrors pass through."""
    raw = store.get_bytes(manifest_key(key))
    if raw is None:
        return None
    where = f"remote cache entry {key[:12]} in {store.url}"
    try:
        manifest = Manifest.from_json(raw)
    except ValueError as e:
        raise RemoteMiss(f"{where} is damaged (unreadable manifest: {e})") from None
    if manifest.key != key:
        raise RemoteMiss(f"{where} is damaged (manifest of another key)")
    if any(_leaves_folder(p) for p in (*manifest.empty_dirs, *(e.path for e in manifest.files))):
        raise RemoteMiss(f"{where} is damaged (a path leaves the outputs folder)")
    return manifest


def fetch_blobs(
    store: ObjectStore,
    manifest: Manifest | TreeDigest,
    blob_dest_of: Callable[[FileEntry], Path],
    workers: int = TRANSFER_WORKERS,
    on_file: Callable[[int], None] | None = None,
) -> Transfer:
    """Every blob `manifest` (a cache entry, or a tree a cluster node stored) names, in place at
    blob_dest_of(entry); Transfer.paths lists the ones downloaded.

    A blob whose destination already holds a file of the right size is not fetched (like the local cache's
    dedupe; the caller judges that file). Downloaded blobs are verified against their digest before they are
    renamed into place and made read-only (0444, or 0555 for an executable entry, the local cache's modes).
    RemoteMiss when a blob is missing or corrupt on the remote: the caller restores nothing; verified blobs
    already in place stay, being correct content. A corrupt blob is deleted from the remote (best effort), so
    that the push after the caller's re-run uploads it again and the entry heals (a missing one is re-uploaded
    likewise). Other RemoteErrors (unreachable, access denied) pass through. `on_file(size)` after each file.
    """
    where = (f"remote cache entry {manifest.key[:12]} in {store.url}" if isinstance(manifest, Manifest)
             else f"stored outputs {manifest.digest[:12]} in {store.url}")
    todo, skipped, seen = [], 0, set()
    for entry in manifest.files:  # by destination, not digest: the local cache keeps .x blobs apart
        dest = blob_dest_of(entry)
        if entry.link is not None or dest in seen:
            continue
        seen.add(dest)
        if _has_size(dest, entry.size):
            skipped += 1
        else:
            todo.append((blob_key(entry.digest), dest, entry.digest, entry))
    try:
        store.get_many([(k, dest, digest) for k, dest, digest, _ in todo], workers, on_file)
    except DigestMismatch as e:
        try:  # content-addressed, so a corrupt object is of no use to anyone: the next push uploads it anew
            store.delete([e.key])
        except RemoteError:
            pass
        raise RemoteMiss(f"{where} is damaged ({_after_remote(e, store)})") from None
    except ObjectMissing as e:
        raise RemoteMiss(f"{where} is damaged ({_after_remote(e, store)})") from None
    for _, dest, _, entry in todo:
        os.chmod(dest, 0o555 if entry.executable else 0o444)
    return Transfer(len(todo), sum(e.size for *_, e in todo), skipped, False, tuple(dest for _, dest, _, _ in todo))


def restore_tree(store: ObjectStore, tree: Manifest | TreeDigest, dest: Path, workers: int = TRANSFER_WORKERS
                 ) -> None:
    """The tree's files downloaded into `dest` (each verified against its digest), its empty folders and
    symlinks made there; RemoteMiss (a PipeError) when a blob is missing or corrupt."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in tree.empty_dirs:
        (dest / folder).mkdir(parents=True, exist_ok=True)
    fetch_blobs(store, tree, lambda entry: dest / entry.path, workers)  # one per file
    for entry in tree.files:  # links last: no file is ever written through one
        if entry.link is not None:
            (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(entry.link, dest / entry.path)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _leaves_folder(path: str) -> bool:
    return path.startswith("/") or ".." in path.split("/")


def _after_remote(error: RemoteError, store: ObjectStore) -> str:
    return str(error).removeprefix(f"remote {store.url}: ")


@dataclass(frozen=True)
class RemoteGcReport:
    entries_removed: int
    entries_kept: int
    young_kept: int  # manifests and blobs that only their age kept (younger than the grace period)
    blobs_removed: int
    blob_bytes: int
    removed_keys: tuple[str, ...]
    remote: str  # the store's URL
    grace_s: float
    dry_run: bool


def gc_remote(store: ObjectStore, keep: set[str], grace_s: float, now: datetime, dry_run: bool = False,
              workers: int = TRANSFER_WORKERS) -> RemoteGcReport:
    """Removes the remote manifests whose key is not in `keep`, then the blobs no remaining manifest names;
    never an object younger than `grace_s` (by the server's modification time).

    The grace period is what makes a collection safe beside pushes on other machines: a push uploads blobs,
    then its manifest; a blob it just sent, or a manifest it just wrote, is young and stays. Manifests are
    listed again after the blobs, and the blobs of any manifest that appeared meanwhile stay too. What is left
    is a push that found an old unreferenced blob present (a HEAD), skipped it, and writes its manifest after
    this collection deleted the blob: that entry then reads as damaged (a warning and a miss, never wrong
    bytes), and its next push re-uploads the blob. An unreadable manifest protects no blob."""
    cutoff = now - timedelta(seconds=grace_s)
    listed = store.list(MANIFESTS)
    removed, kept, young = [], [], 0
    for obj in listed:
        key = obj.key.removeprefix(MANIFESTS).removesuffix(".json")
        if not key or not all(c in "0123456789abcdef" for c in key):
            continue  # not pipe's: left alone
        if key in keep:
            kept.append(key)
        elif obj.modified > cutoff:
            kept.append(key)
            young += 1
        else:
            removed.append(key)

    def blobs_named(key: str) -> set[str]:
        try:
            manifest = read_manifest(store, key)
        except RemoteMiss:
            return set()
        return {blob_key(digest) for digest in blobs_of(manifest)} if manifest is not None else set()

    referenced: set[str] = set().union(*bounded_map(blobs_named, kept, workers))
    blobs = store.list(BLOBS)
    seen = {obj.key for obj in listed}
    appeared = [key for o in store.list(MANIFESTS) if o.key not in seen
                and (key := o.key.removeprefix(MANIFESTS).removesuffix(".json"))
                and all(c in "0123456789abcdef" for c in key)]
    referenced |= set().union(*bounded_map(blobs_named, appeared, workers))
    gone = []
    for obj in blobs:
        if obj.key in referenced:
            continue
        if obj.modified > cutoff:
            young += 1
        else:
            gone.append(obj)
    if not dry_run:
        store.delete(manifest_key(key) for key in removed)  # manifests first: no entry names a deleted blob
        store.delete(obj.key for obj in gone)
    return RemoteGcReport(len(removed), len(kept), young, len(gone), sum(o.size for o in gone),
                          tuple(sorted(removed)), store.url, grace_s, dry_run)
