"""Where a run looks cache entries up, restores them from and saves them to: the CacheStore seam.

Three stores answer it. `cache.Cache` is the local one (runs/cache: hard links or reflinks). `RemoteCache` is an
object store alone (remote.py's layout): lookup reads the manifest, restore downloads verified blobs straight
into the outputs folder, save uploads the outputs; for a host without a local cache. `LayeredCache` asks the
local cache first, then the remote: for a run (`fetch=True`) a remote hit is brought into the local cache (its
blobs verified, then its manifest filed with Cache.adopt) before decide() returns, so the decision is final and
the restore is local; for a dry run or `pipe status` (`fetch=False`) a remote hit is only reported, nothing is
written. decide() and the runner speak to a CacheStore and never touch blobs or manifests themselves. A swarm
run also uses `fetch=False`: a remote hit is brought in by restore() only for a stage whose outputs come to this
host (--fetch), and the LayeredCache is the runner's StoredOutputs, where nodes leave outputs in the blobs.

Pushing (upload after a run, `pipe push`) and pulling (`pipe pull`) move entries between the local cache and a
remote: `push` and `pull` here, reporting per entry. No S3 library here: objectstore.py is the only one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator.cache import Cache, Fetched, Lookup, Manifest
from orchestrator.cachekey import Ingredients
from orchestrator.errors import PipeError, RemoteError
from orchestrator.hashing import TreeDigest
from orchestrator.objectstore import TRANSFER_WORKERS, ObjectStore, bounded_map
from orchestrator.remote import (
    RemoteMiss,
    blob_key,
    blobs_of,
    fetch_blobs,
    manifest_key,
    push_entry,
    read_manifest,
    restore_tree,
)


class CacheStore(Protocol):
    """What decide() and the runner need of a cache, wherever its bytes are."""

    def lookup(self, key: str) -> Lookup:
        """A hit (manifest), a plain miss, or a damaged entry (a miss with a problem to warn of); never raises
        for a damaged or unreachable store: that is a miss."""
        ...

    def restore(self, manifest: Manifest, dest: Path) -> None:
        """The entry's outputs materialised in `dest` (absent or empty); PipeError leaves dest to the caller."""
        ...

    def save(self, key: str, outputs_dir: Path, tree: TreeDigest, ingredients: Ingredients, run_id: str,
             stage: str) -> Manifest:
        """Stores a successful stage's outputs under `key`; the manifest appears last, atomically."""
        ...


class Progress(Protocol):
    """A transfer's progress, for a terminal: work as it becomes known, and each file as it is done."""

    def expect(self, files: int, nbytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


class NoProgress:
    def expect(self, files: int, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


class RemoteCache:
    """A CacheStore on an object store alone (remote.py's layout)."""

    def __init__(self, store: ObjectStore, workers: int = TRANSFER_WORKERS) -> None:
        self.store, self.workers = store, workers

    @property
    def url(self) -> str:
        return self.store.url

    def lookup(self, key: str) -> Lookup:
        """One GET of the manifest; its blobs are checked when they are downloaded. RemoteError (unreachable,
        denied) passes through: LayeredCache decides what an unreachable remote means."""
        try:
            manifest = read_manifest(self.store, key)
        except RemoteMiss as e:
            return Lookup(None, str(e))
        return Lookup(manifest, remote=self.store.url) if manifest is not None else Lookup(None)

    def restore(self, manifest: Manifest, dest: Path) -> None:
        """Downloads every file into dest, each verified against its digest (RemoteMiss, a PipeError, if not)."""
        restore_tree(self.store, manifest, dest, self.workers)

    def save(self, key: str, outputs_dir: Path, tree: TreeDigest, ingredients: Ingredients, run_id: str,
             stage: str) -> Manifest:
        manifest = Manifest.of(key, tree, ingredients, run_id, stage)
        push_entry(self.store, manifest, lambda entry: outputs_dir / entry.path, self.workers)
        return manifest


class LayeredCache:
    """The local cache first, then the remote. Thread-safe (the runner's stages look up in parallel).

    A remote that does not answer, or refuses, is a miss with one warning, and is not asked again by this
    LayeredCache (one run): the run goes on locally. A remote entry with a missing or corrupt blob is a warning
    and a miss; with `fetch`, its manifest is deleted from the remote (best effort; remote.fetch_blobs already
    deleted a corrupt blob), so that the re-run's push files a whole entry again."""

    def __init__(self, local: Cache, remote: RemoteCache, fetch: bool, progress: Progress | None = None) -> None:
        self.local, self.remote, self.fetch = local, remote, fetch
        self.progress = progress or NoProgress()
        self.offline: str | None = None  # why the remote is no longer asked
        self._lock = threading.Lock()
        self._from_remote: set[str] = set()

    @property
    def url(self) -> str:
        return self.remote.url

    def from_remote(self, key: str) -> bool:
        """Whether this store found `key` on the remote, brought it or filed it there (the push after the run
        need not send it)."""
        with self._lock:
            return key in self._from_remote

    def lookup(self, key: str) -> Lookup:
        found = self.local.lookup(key)
        if found.manifest is not None or self.offline is not None:
            return found
        try:
            there = self.remote.lookup(key)
        except RemoteError as e:
            return Lookup(None, _join(found.problem, self._gone(e)))
        if there.manifest is None:
            return Lookup(None, _join(found.problem, there.problem))
        if not self.fetch:
            with self._lock:
                self._from_remote.add(key)  # there already: never pushed back
            return there
        brought = self.bring(there.manifest)
        return brought if brought.manifest is not None else Lookup(None, _join(found.problem, brought.problem))

    def bring(self, manifest: Manifest) -> Lookup:
        """The remote entry's blobs into the local cache, then its manifest filed there: a local hit."""
        start = time.monotonic()
        self.progress.expect(sum(e.link is None for e in manifest.files), manifest.total_size)
        try:
            transfer = fetch_blobs(self.remote.store, manifest, self.local.blob_path, self.remote.workers,
                                   self.progress.advance)
        except RemoteMiss as e:
            self._forget(manifest.key)
            return Lookup(None, str(e))
        except RemoteError as e:
            return Lookup(None, self._gone(e))
        try:
            filed = self.local.adopt(manifest, frozenset(transfer.paths))
        except PipeError as e:
            return Lookup(None, str(e))
        with self._lock:
            self._from_remote.add(manifest.key)
        fetched = Fetched(transfer.files, transfer.bytes, time.monotonic() - start)
        return Lookup(filed, remote=self.remote.url, fetched=fetched)

    def restore(self, manifest: Manifest, dest: Path) -> None:
        """A local restore; a remote hit that decide() left on the remote (fetch=False) is brought here first
        (with fetch, decide() brought it already: no second lookup on a run's restore path)."""
        if not self.fetch and self.local.lookup(manifest.key).manifest is None:
            brought = self.bring(manifest)
            if brought.manifest is None:
                raise RemoteError(brought.problem or f"remote cache entry {manifest.key[:12]} could not be fetched")
        self.local.restore(manifest, dest)

    # -- outputs a cluster executor left in the remote's blobs (runner.StoredOutputs) --------------------------

    def file(self, key: str, tree: TreeDigest, ingredients: Ingredients, run_id: str, stage: str) -> None:
        """The manifest of outputs whose blobs a node has just sent: a put, not put_if_absent, so that it
        replaces an entry of this key whose blob went missing (the reason the stage ran again)."""
        manifest = Manifest.of(key, tree, ingredients, run_id, stage)
        self.remote.store.put_bytes(manifest_key(key), manifest.to_json().encode("utf-8"))
        with self._lock:
            self._from_remote.add(key)  # on the remote already: the push after the run has nothing to send

    def has_blobs(self, tree: TreeDigest) -> bool:
        blobs = [blob_key(digest) for digest in blobs_of(tree)]
        return all(bounded_map(self.remote.store.exists, blobs, self.remote.workers))  # a HEAD each, in parallel

    def download(self, tree: TreeDigest, dest: Path) -> None:
        restore_tree(self.remote.store, tree, dest, self.remote.workers)

    def save(self, key: str, outputs_dir: Path, tree: TreeDigest, ingredients: Ingredients, run_id: str,
             stage: str) -> Manifest:
        return self.local.save(key, outputs_dir, tree, ingredients, run_id, stage)

    def _gone(self, error: RemoteError) -> str:
        with self._lock:
            first = self.offline is None
            self.offline = self.offline or str(error)
        return f"{error}; not asked again in this run" if first else ""

    def _forget(self, key: str) -> None:
        try:  # a manifest naming a blob that is gone helps nobody; the re-run's push files a whole one
            self.remote.store.delete([manifest_key(key)])
        except RemoteError:
            pass


def _join(*problems: str | None) -> str | None:
    return "; ".join(p for p in problems if p) or None


# ---- push and pull --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntrySync:
    """One entry's fate in a push or pull. status: pushed, pulled, present (the other side had it), missing
    (pull: not on the remote; push: not in the local cache any more), damaged (a warning; see message), failed
    (the transfer stopped: see SyncReport.error), unknown (pull: the key cannot be known yet; message says why)."""

    stage: str
    key: str | None
    status: str
    files: int = 0
    bytes: int = 0
    message: str = ""


@dataclass(frozen=True)
class SyncReport:
    remote: str
    action: str  # push | pull
    entries: tuple[EntrySync, ...]
    seconds: float
    error: str | None = None  # the RemoteError that stopped the transfer; entries after it are `failed`
    run_id: str | None = None

    @property
    def files(self) -> int:
        return sum(e.files for e in self.entries)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def ok(self) -> bool:
        return self.error is None and not any(e.status in ("failed", "damaged") for e in self.entries)

    def count(self, status: str) -> int:
        return sum(e.status == status for e in self.entries)


@dataclass
class _Counter:
    files: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.files, self.bytes = self.files + 1, self.bytes + nbytes


def push(local: Cache, remote: RemoteCache, items: Sequence[tuple[str, str]], *, check_first: frozenset[str]
         = frozenset(), progress: Progress | None = None, run_id: str | None = None) -> SyncReport:
    """Uploads the local entries of `items` ((stage, key), in order): blobs the remote lacks, then the manifest.

    Keys in `check_first` (restored from the local cache by the run, so probably pushed before) cost one HEAD
    when the remote has their manifest already. A RemoteError stops the push: the entries not done are
    `failed`, SyncReport.error says why, and no manifest of theirs is visible remotely (remote.push_entry
    writes it last); pushing again resumes (blobs there are not sent twice)."""
    progress = progress or NoProgress()
    start, done, error = time.monotonic(), [], None
    for stage, key in items:
        if error is not None:
            done.append(EntrySync(stage, key, "failed"))
            continue
        found = local.lookup(key)
        if found.manifest is None:
            done.append(EntrySync(stage, key, "missing", message=found.problem or "not in the local cache"))
            continue
        counter = _Counter()

        def sent(nbytes: int, counter: _Counter = counter) -> None:
            counter.add(nbytes)
            progress.advance(nbytes)

        try:
            if key in check_first and remote.store.exists(manifest_key(key)):
                done.append(EntrySync(stage, key, "present"))
                continue
            transfer = push_entry(remote.store, found.manifest, local.blob_path, remote.workers, sent,
                                  progress.expect)
        except RemoteError as e:
            error = str(e)
            done.append(EntrySync(stage, key, "failed", counter.files, counter.bytes))
            continue
        status = "pushed" if transfer.manifest_written else "present"  # present: another's manifest won
        done.append(EntrySync(stage, key, status, transfer.files, transfer.bytes))
    return SyncReport(remote.url, "push", tuple(done), time.monotonic() - start, error, run_id)


def pull(layered: LayeredCache, items: Sequence[tuple[str, str | None, str]], *, run_id: str | None = None
         ) -> SyncReport:
    """Brings the remote entries of `items` ((stage, key or None, why unknown)) into the local cache."""
    start, done = time.monotonic(), []
    for stage, key, why in items:
        if key is None:
            done.append(EntrySync(stage, None, "unknown", message=why))
            continue
        if layered.local.lookup(key).manifest is not None:
            done.append(EntrySync(stage, key, "present"))
            continue
        if layered.offline is not None:
            done.append(EntrySync(stage, key, "failed"))
            continue
        try:
            there = layered.remote.lookup(key)
        except RemoteError as e:
            layered.offline = str(e)
            done.append(EntrySync(stage, key, "failed"))
            continue
        if there.manifest is None:
            status = "damaged" if there.problem else "missing"
            done.append(EntrySync(stage, key, status, message=there.problem or ""))
            continue
        brought = layered.bring(there.manifest)
        if brought.manifest is None or brought.fetched is None:
            status = "failed" if layered.offline is not None else "damaged"
            done.append(EntrySync(stage, key, status, message=brought.problem or ""))
            continue
        done.append(EntrySync(stage, key, "pulled", brought.fetched.files, brought.fetched.bytes))
    return SyncReport(layered.url, "pull", tuple(done), time.monotonic() - start, layered.offline, run_id)


def pushable(results: Sequence[tuple[str, str | None, bool, bool]]) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """From a run's stages (name, cache key, succeeded fresh, restored from the remote): what `push: auto`
    uploads, in order, and the keys to check with one HEAD first (restored from the local cache)."""
    items, check = [], set()
    for name, key, fresh, from_remote in results:
        if key is None or from_remote:
            continue
        items.append((name, key))
        if not fresh:
            check.add(key)
    return items, frozenset(check)

