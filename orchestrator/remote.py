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
from pathlib import Path

from orchestrator.cache import Manifest
from orchestrator.errors import RemoteError
from orchestrator.hashing import FileEntry
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


def blob_key(digest: str) -> str:
    if len(digest) < 3 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a content digest: {digest!r}")
    return f"{BLOBS}{digest[:2]}/{digest}"


def manifest_key(key: str) -> str:
    if not key or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key: {key!r}")
    return f"{MANIFESTS}{key}.json"


def blobs_of(manifest: Manifest) -> dict[str, FileEntry]:
    """One entry per distinct content digest among the manifest's files (symlinks have no blob)."""
    return {entry.digest: entry for entry in manifest.files if entry.link is None}


def push_entry(
    store: ObjectStore,
    manifest: Manifest,
    blob_path_of: Callable[[FileEntry], Path],
    workers: int = TRANSFER_WORKERS,
) -> Transfer:
    """Uploads the entry's blobs that the remote lacks (read from blob_path_of(entry)), then its manifest.

    A blob already on the remote is not sent again (an object there is whole: a PUT is atomic and a multipart
    upload appears only when completed; corruption on the server is caught by the reader's digest check); the manifest goes last, and only if
    no manifest of this key is there yet. RemoteError when a transfer fails: blobs sent so far stay (they are
    content-addressed and harmless), and no manifest names them yet.
    """
    blobs = [(blob_key(digest), entry) for digest, entry in blobs_of(manifest).items()]
    present = bounded_map(lambda item: store.exists(item[0]), blobs, workers)  # a HEAD each, in parallel
    todo = [(key, blob_path_of(entry), entry.size) for (key, entry), there in zip(blobs, present) if not there]
    skipped = len(blobs) - len(todo)
    store.put_many([(key, path) for key, path, _ in todo], workers)
    written = store.put_if_absent(manifest_key(manifest.key), manifest.to_json().encode("utf-8"))
    return Transfer(len(todo), sum(size for _, _, size in todo), skipped, written)


def fetch_entry(
    store: ObjectStore,
    key: str,
    blob_dest_of: Callable[[FileEntry], Path],
    workers: int = TRANSFER_WORKERS,
) -> tuple[Manifest, Transfer] | None:
    """The remote manifest of `key` with every blob it names in place at blob_dest_of(entry), or None.

    None when the remote has no manifest for the key. A blob whose destination already holds a file of the
    right size is not fetched (like the local cache's dedupe). Downloaded blobs are verified against their
    digest before they are renamed into place and made read-only (0444, or 0555 for an executable entry, the
    local cache's modes). RemoteMiss when the manifest is unreadable or names another key, or a blob is missing
    or corrupt on the remote: no manifest is returned, so nothing is restored; verified blobs already in place
    stay, being correct content. A corrupt blob is deleted from the remote (best effort), so that the push after
    the caller's re-run uploads it again and the entry heals (a missing one is re-uploaded likewise).
    Other RemoteErrors (unreachable, access denied) pass through.
    """
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
        store.get_many([(k, dest, digest) for k, dest, digest, _ in todo], workers)
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
    return manifest, Transfer(len(todo), sum(e.size for *_, e in todo), skipped, False)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _leaves_folder(path: str) -> bool:
    return path.startswith("/") or ".." in path.split("/")


def _after_remote(error: RemoteError, store: ObjectStore) -> str:
    return str(error).removeprefix(f"remote {store.url}: ")
