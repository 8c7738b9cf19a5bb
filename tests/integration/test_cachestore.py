"""The CacheStore seam against a real S3 server (radosgw from scripts/s3.sh): RemoteCache, LayeredCache, push,
pull, remote gc and Cache.adopt. No mock of S3: the `s3` fixture gives each test a bucket of its own."""

from __future__ import annotations

import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.cache import Cache, Manifest
from orchestrator.cachekey import Ingredients
from orchestrator.cachestore import LayeredCache, RemoteCache, push, pushable
from orchestrator.errors import PipeError
from orchestrator.hashing import hash_tree
from orchestrator.objectstore import ObjectStore
from orchestrator.remote import blob_key, gc_remote, manifest_key
from tests.conftest import S3Bucket


def ingredients(tag: str) -> Ingredients:
    return Ingredients(image="sha256:" + "1" * 64, command=[tag], entrypoint=None, workdir="/w", env={},
                       params={}, inputs={}, upstream={})


def saved(cache: Cache, tmp_path: Path, tag: str = "train", content: bytes = b"weights") -> Manifest:
    out = tmp_path / f"out-{tag}"
    (out / "sub").mkdir(parents=True)
    (out / "model.bin").write_bytes(content)
    (out / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (out / "sub" / "run.sh").chmod(0o755)
    (out / "latest").symlink_to("model.bin")
    ing = ingredients(tag)
    return cache.save(ing.key(), out, hash_tree(out), ing, "run-1", tag)


def remote_of(s3: S3Bucket, endpoint: str | None = None) -> RemoteCache:
    return RemoteCache(ObjectStore(s3.url(), endpoint or s3.endpoint, max_attempts=1, connect_timeout=2))


def test_a_layered_run_lookup_brings_the_remote_entry_into_the_local_cache(s3: S3Bucket, tmp_path: Path) -> None:
    first = Cache(tmp_path / "a")
    manifest = saved(first, tmp_path)
    report = push(first, remote_of(s3), [("train", manifest.key)])
    assert report.ok and [e.status for e in report.entries] == ["pushed"]

    second = Cache(tmp_path / "b")
    probe = LayeredCache(second, remote_of(s3), fetch=False)
    seen = probe.lookup(manifest.key)
    assert seen.manifest == manifest and seen.remote == s3.url() and seen.fetched is None
    assert not (tmp_path / "b").exists()  # a forecast writes nothing

    layered = LayeredCache(second, remote_of(s3), fetch=True)
    hit = layered.lookup(manifest.key)
    assert hit.remote == s3.url() and hit.fetched is not None and hit.fetched.files == 2
    assert hit.fetched.bytes == len(b"weights") + len("#!/bin/sh\n")
    assert layered.from_remote(manifest.key)
    assert second.lookup(manifest.key).manifest == manifest  # filed locally, sealed: a plain local hit now
    layered.restore(manifest, tmp_path / "restored")
    assert hash_tree(tmp_path / "restored").digest == manifest.digest


def test_a_corrupt_remote_blob_is_a_miss_and_the_entry_is_removed_for_the_next_push(
    s3: S3Bucket, tmp_path: Path
) -> None:
    first = Cache(tmp_path / "a")
    manifest = saved(first, tmp_path)
    push(first, remote_of(s3), [("train", manifest.key)])
    model = next(e for e in manifest.files if e.path == "model.bin")
    s3.raw.put_object(Bucket=s3.name, Key=f"pipe/{blob_key(model.digest)}", Body=b"WEIGHTS")  # same size

    layered = LayeredCache(Cache(tmp_path / "b"), remote_of(s3), fetch=True)
    miss = layered.lookup(manifest.key)
    assert miss.manifest is None and miss.problem is not None and "is corrupt" in miss.problem
    keys = s3.object_keys()
    assert f"pipe/{blob_key(model.digest)}" not in keys and f"pipe/{manifest_key(manifest.key)}" not in keys
    assert Cache(tmp_path / "b").lookup(manifest.key).manifest is None  # nothing filed locally

    again = push(first, remote_of(s3), [("train", manifest.key)])  # what the re-run's push does
    assert [e.status for e in again.entries] == ["pushed"] and again.files == 1  # only the healed blob
    assert LayeredCache(Cache(tmp_path / "c"), remote_of(s3), fetch=True).lookup(manifest.key).manifest == manifest


def test_an_unreachable_remote_is_one_warning_then_silence(s3: S3Bucket, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    layered = LayeredCache(Cache(tmp_path / "b"), remote_of(s3, f"http://127.0.0.1:{port}"), fetch=True)
    first, second = layered.lookup("ab" * 32), layered.lookup("cd" * 32)
    assert first.manifest is None and first.problem is not None and "cannot reach" in first.problem
    assert second.manifest is None and second.problem is None
    assert layered.offline is not None


def test_two_caches_pushing_one_key_at_once_leave_one_whole_manifest(s3: S3Bucket, tmp_path: Path) -> None:
    caches = [Cache(tmp_path / name) for name in "ab"]
    manifests = [saved(cache, tmp_path / name) for cache, name in zip(caches, "ab")]
    assert manifests[0].key == manifests[1].key
    barrier, reports = threading.Barrier(2), {}

    def push_one(i: int) -> None:
        barrier.wait()
        reports[i] = push(caches[i], remote_of(s3), [("train", manifests[i].key)])

    threads = [threading.Thread(target=push_one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(reports[i].entries[0].status for i in range(2))
    assert statuses == ["present", "pushed"]  # exactly one manifest write won
    assert sum(1 for k in s3.object_keys() if k.startswith("pipe/manifests/")) == 1
    got = LayeredCache(Cache(tmp_path / "c"), remote_of(s3), fetch=True).lookup(manifests[0].key).manifest
    assert got is not None and got.run_id == "run-1" and got.digest == manifests[0].digest


def test_remote_cache_alone_saves_and_restores_outputs(s3: S3Bucket, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "empty").mkdir(parents=True)
    (out / "a.txt").write_text("same")
    (out / "b.txt").write_text("same")
    (out / "link").symlink_to("a.txt")
    ing = ingredients("alone")
    remote = remote_of(s3)
    manifest = remote.save(ing.key(), out, hash_tree(out), ing, "run-9", "alone")
    assert remote.lookup(ing.key()).manifest == manifest
    remote.restore(manifest, tmp_path / "back")
    assert hash_tree(tmp_path / "back").digest == manifest.digest
    assert (tmp_path / "back" / "empty").is_dir() and os.readlink(tmp_path / "back" / "link") == "a.txt"


def test_remote_gc_keeps_what_is_kept_and_what_is_young(s3: S3Bucket, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "a")
    kept, dropped = saved(cache, tmp_path, "kept", b"one"), saved(cache, tmp_path, "dropped", b"two")
    remote = remote_of(s3)
    push(cache, remote, [("kept", kept.key), ("dropped", dropped.key)])
    now = datetime.now(UTC) + timedelta(seconds=5)  # every object is 5 s old for this collection
    young = gc_remote(remote.store, {kept.key}, 3600, now)
    assert (young.entries_removed, young.blobs_removed) == (0, 0) and young.young_kept >= 1
    dry = gc_remote(remote.store, {kept.key}, 0, now, dry_run=True)
    assert dry.removed_keys == (dropped.key,) and dry.blobs_removed == 1 and dry.blob_bytes == 3
    assert f"pipe/{manifest_key(dropped.key)}" in s3.object_keys()  # a dry run removes nothing
    done = gc_remote(remote.store, {kept.key}, 0, now)
    assert (done.entries_removed, done.blobs_removed, done.entries_kept) == (1, 1, 1)
    keys = s3.object_keys()
    assert f"pipe/{manifest_key(dropped.key)}" not in keys and f"pipe/{manifest_key(kept.key)}" in keys
    # run.sh is shared by both entries: it stays, as does every blob of the kept entry
    assert all(f"pipe/{blob_key(e.digest)}" in keys for e in kept.files if e.link is None)
    assert LayeredCache(Cache(tmp_path / "c"), remote, fetch=True).lookup(kept.key).manifest == kept


def test_adopt_refuses_a_blob_that_does_not_hash_to_its_digest(tmp_path: Path) -> None:
    source = Cache(tmp_path / "a")
    manifest = saved(source, tmp_path)
    target = Cache(tmp_path / "b")
    for entry in manifest.files:
        if entry.link is None:
            blob = target.blob_path(entry)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(b"WEIGHTS" if entry.path == "model.bin" else source.blob_path(entry).read_bytes())
    with pytest.raises(PipeError, match="is corrupt"):
        target.adopt(manifest)  # not fresh: the untagged blobs are hashed again
    assert target.lookup(manifest.key).manifest is None


def test_pushable_skips_remote_hits_and_checks_local_ones_first() -> None:
    items, check = pushable([("a", "k1", True, False), ("b", "k2", False, False), ("c", "k3", False, True),
                             ("d", None, True, False)])
    assert items == [("a", "k1"), ("b", "k2")] and check == frozenset({"k2"})
