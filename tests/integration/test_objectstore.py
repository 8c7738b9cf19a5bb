"""objectstore and remote against a real S3 server (radosgw from scripts/s3.sh): no mock of S3 anywhere here.

The `s3` fixture gives each test a bucket of its own; it fails, never skips, in CI (PIPE_REQUIRE_DOCKER).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cache import Cache, Manifest
from orchestrator.cachekey import Ingredients
from orchestrator.errors import ExitCode, RemoteError
from orchestrator.hashing import hash_file, hash_tree
from orchestrator.objectstore import DigestMismatch, ObjectMissing, ObjectStore
from orchestrator.remote import RemoteMiss, blob_key, fetch_entry, manifest_key, push_entry
from tests.conftest import S3Bucket

MiB = 1 << 20


def store_of(s3: S3Bucket, **options: Any) -> ObjectStore:
    return ObjectStore(s3.url(), s3.endpoint, **options)


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_put_then_get_is_byte_identical(s3: S3Bucket, tmp_path: Path) -> None:
    store = store_of(s3)
    src = random_file(tmp_path / "a.bin", 3 * MiB + 17)
    store.put_file("x/a.bin", src)
    dest = tmp_path / "out" / "a.bin"
    store.get_file("x/a.bin", dest, hash_file(src))
    assert dest.read_bytes() == src.read_bytes()
    assert store.exists("x/a.bin") and not store.exists("x/b.bin")
    assert [(o.key, o.size) for o in store.list("x/")] == [("x/a.bin", 3 * MiB + 17)]
    assert s3.object_keys() == ["pipe/x/a.bin"]  # under the URL's prefix
    assert sorted(os.listdir(dest.parent)) == ["a.bin"]  # no temporary file left


def test_plain_http_works_whatever_aws_ca_bundle_says(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "no-such-ca.pem"))
    store = store_of(s3)
    store.put_file("k", random_file(tmp_path / "f", 1000))
    assert store.exists("k")


def test_large_file_goes_up_in_parts_and_back_identical(s3: S3Bucket, tmp_path: Path) -> None:
    store = store_of(s3, part_bytes=5 * MiB, multipart_min_bytes=5 * MiB)
    src = random_file(tmp_path / "big", 20 * MiB + 3)
    store.put_file("big", src)
    head = s3.raw.head_object(Bucket=s3.name, Key="pipe/big")
    assert head["ContentLength"] == 20 * MiB + 3
    assert head["ETag"].strip('"').endswith("-5")  # a multipart object of 5 parts (4 of 5 MiB and the rest)
    dest = tmp_path / "got"
    store.get_file("big", dest, hash_file(src))
    assert dest.read_bytes() == src.read_bytes()


def test_a_multipart_upload_failing_midway_leaves_nothing(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(s3, part_bytes=5 * MiB, multipart_min_bytes=5 * MiB)
    src = random_file(tmp_path / "big", 20 * MiB)
    reads: list[int] = []
    real_read = store._read_part

    def failing_read(fd: int, offset: int, length: int) -> bytes:  # the disk fails on the third part
        reads.append(offset)
        if offset == 2 * 5 * MiB:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(fd, offset, length)

    monkeypatch.setattr(store, "_read_part", failing_read)
    with pytest.raises(RemoteError, match="cannot read .*big: Input/output error"):
        store.put_file("big", src)
    assert 2 * 5 * MiB in reads
    assert s3.object_keys() == [] and s3.uploads() == []  # no object, and the upload (with its parts) aborted


def test_a_server_error_midway_through_parts_aborts_the_upload(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.exceptions

    store = store_of(s3, part_bytes=5 * MiB, multipart_min_bytes=5 * MiB)
    real_upload_part = store._client.upload_part

    def upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 3:  # the connection drops after two parts reached the server
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=s3.endpoint)
        return real_upload_part(**kwargs)

    monkeypatch.setattr(store._client, "upload_part", upload_part)
    with pytest.raises(RemoteError, match="cannot reach"):
        store.put_file("big", random_file(tmp_path / "big", 20 * MiB))
    assert s3.object_keys() == [] and s3.uploads() == []


def test_a_corrupted_object_is_a_digest_mismatch_and_nothing_is_written(s3: S3Bucket, tmp_path: Path) -> None:
    store = store_of(s3)
    src = random_file(tmp_path / "f", 100_000)
    store.put_file("f", src)
    s3.raw.put_object(Bucket=s3.name, Key="pipe/f", Body=b"not the content")  # damage on the server
    dest = tmp_path / "out" / "f"
    with pytest.raises(DigestMismatch, match=r"^remote s3://[^ ]+/pipe/: f is corrupt \(its content hashes to"):
        store.get_file("f", dest, hash_file(src))
    assert os.listdir(dest.parent) == []  # neither dest nor a temporary file


def test_a_corrupted_large_object_fetched_in_ranges_is_a_digest_mismatch(s3: S3Bucket, tmp_path: Path) -> None:
    store = store_of(s3, part_bytes=5 * MiB, multipart_min_bytes=5 * MiB)
    src = random_file(tmp_path / "big", 12 * MiB)
    store.put_file("big", src)
    damaged = bytearray(src.read_bytes())
    damaged[7 * MiB] ^= 0xFF  # one flipped byte in the second range, same size
    s3.raw.put_object(Bucket=s3.name, Key="pipe/big", Body=bytes(damaged))
    dest = tmp_path / "out" / "big"
    with pytest.raises(DigestMismatch, match="big is corrupt"):
        store.get_file("big", dest, hash_file(src))
    assert os.listdir(dest.parent) == []


def test_a_missing_object_is_object_missing(s3: S3Bucket, tmp_path: Path) -> None:
    store = store_of(s3)
    with pytest.raises(ObjectMissing, match="nothing does not exist"):
        store.get_file("nothing", tmp_path / "x", "0" * 64)
    assert store.get_bytes("nothing") is None


def test_two_threads_put_if_absent_leave_exactly_one_whole_object(s3: S3Bucket) -> None:
    store = store_of(s3)
    barrier = threading.Barrier(2)
    won: dict[int, bool] = {}
    payloads = {0: b"A" * 100_000, 1: b"B" * 100_000}

    def writer(i: int) -> None:
        barrier.wait()
        won[i] = store.put_if_absent("manifests/k.json", payloads[i])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won.values()) == [False, True]
    winner = next(i for i, w in won.items() if w)
    assert store.get_bytes("manifests/k.json") == payloads[winner]
    assert store.put_if_absent("manifests/k.json", b"later") is False


def test_put_if_absent_falls_back_when_the_server_lacks_conditional_puts(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.exceptions

    store = store_of(s3)
    real_put = store._client.put_object

    def put_object(**kwargs: Any) -> Any:  # a server that answers 501 to If-None-Match (some older ones do)
        if "IfNoneMatch" in kwargs:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject"
            )
        return real_put(**kwargs)

    monkeypatch.setattr(store._client, "put_object", put_object)
    assert store.put_if_absent("m", b"first") is True
    assert store.put_if_absent("m", b"second") is False
    assert store.get_bytes("m") == b"first"


def test_wrong_credentials_are_one_line_without_the_secret(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "wrong-secret-Zq81x7"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = store_of(s3, max_attempts=1)
    expected = f"remote {s3.url()}: access denied (check AWS credentials)"
    for attempt in (
        store.check,
        lambda: store.exists("k"),
        lambda: store.put_file("k", random_file(tmp_path / "f", 10)),
        lambda: store.get_bytes("k"),
        lambda: store.list(),
    ):
        with pytest.raises(RemoteError) as caught:
            attempt()
        assert str(caught.value) == expected
        assert caught.value.exit_code == ExitCode.INFRA
        assert secret not in str(caught.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-user")
    with pytest.raises(RemoteError, match="access denied"):
        store_of(s3, max_attempts=1).check()


def test_a_bucket_that_does_not_exist_is_named(s3: S3Bucket, tmp_path: Path) -> None:
    store = ObjectStore(f"s3://{s3.name}-missing/p/", s3.endpoint)
    expected = f"remote s3://{s3.name}-missing/p/: bucket {s3.name}-missing does not exist"
    for attempt in (
        store.check,
        lambda: store.exists("k"),  # a HEAD's 404 alone cannot tell: exists() checks the bucket
        lambda: store.put_file("k", random_file(tmp_path / "f", 10)),
        lambda: store.get_bytes("k"),
        lambda: store.list(),
    ):
        with pytest.raises(RemoteError) as caught:
            attempt()
        assert str(caught.value) == expected


def test_an_unreachable_endpoint_is_one_line(s3: S3Bucket) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = ObjectStore("s3://b/p/", f"http://127.0.0.1:{port}", max_attempts=2, connect_timeout=2)
    with pytest.raises(RemoteError) as caught:
        store.exists("k")
    assert str(caught.value) == f"remote s3://b/p/: cannot reach http://127.0.0.1:{port} (connection failed)"
    assert caught.value.exit_code == ExitCode.INFRA


def test_put_many_and_get_many_move_every_file(s3: S3Bucket, tmp_path: Path) -> None:
    store = store_of(s3)
    files = [random_file(tmp_path / f"f{i}", 1000 + i) for i in range(40)]
    store.put_many([(f"many/{p.name}", p) for p in files], workers=4)
    assert len(store.list("many/")) == 40
    store.get_many([(f"many/{p.name}", tmp_path / "back" / p.name, hash_file(p)) for p in files], workers=4)
    assert all((tmp_path / "back" / p.name).read_bytes() == p.read_bytes() for p in files)
    store.delete([f"many/{p.name}" for p in files])
    assert store.list("many/") == []


# -- remote.py: entries of the local cache, pushed and fetched ---------------------------------------------


def saved_entry(tmp_path: Path) -> tuple[Cache, Manifest]:
    out = tmp_path / "a" / "runs" / "run-1" / "train"
    (out / "sub").mkdir(parents=True)
    (out / "model.bin").write_bytes(os.urandom(300_000))
    (out / "copy.bin").write_bytes((out / "model.bin").read_bytes())  # same content: one blob
    (out / "sub" / "metrics.json").write_text('{"r2": 0.5}')
    (out / "run.sh").write_text("#!/bin/sh\n")
    (out / "run.sh").chmod(0o755)
    (out / "run2.sh").write_text("#!/bin/sh\n")  # one content, plain (sub/plain.sh) and executable: one blob
    (out / "run2.sh").chmod(0o755)
    (out / "sub" / "plain.sh").write_text("#!/bin/sh\n")
    (out / "latest").symlink_to("model.bin")
    cache = Cache(tmp_path / "a" / "runs" / "cache")
    ing = Ingredients(
        image="sha256:" + "1" * 64, command=("train",), entrypoint=None, workdir="/w",
        env={}, params={}, inputs={}, upstream={},
    )
    return cache, cache.save(ing.key(), out, hash_tree(out), ing, "run-1", "train")


def test_push_then_fetch_into_an_empty_cache_restores_identical_outputs(s3: S3Bucket, tmp_path: Path) -> None:
    cache, manifest = saved_entry(tmp_path)
    store = store_of(s3)
    pushed = push_entry(store, manifest, cache.blob_path)
    assert (pushed.files, pushed.skipped, pushed.manifest_written) == (3, 0, True)  # model/copy share a blob
    assert s3.object_keys()[-1] == f"pipe/{manifest_key(manifest.key)}"  # sorted: blobs/ before manifests/
    again = push_entry(store, manifest, cache.blob_path)
    assert (again.files, again.skipped, again.manifest_written) == (0, 3, False)

    second = Cache(tmp_path / "b" / "runs" / "cache")  # another machine: empty state dir
    assert second.lookup(manifest.key).manifest is None
    fetched = fetch_entry(store, manifest.key, second.blob_path)
    assert fetched is not None
    got, transfer = fetched
    assert got == manifest and transfer.files == 4  # run.sh's content twice locally: blobs/…/<d> and <d>.x
    assert second.lookup(manifest.key).manifest is None  # fetch_entry placed blobs only; the caller files it
    assert len(transfer.paths) == 4
    filed = second.adopt(got, frozenset(transfer.paths))  # seals the verified blobs, then files the manifest
    assert filed == manifest  # sealed like the original: every blob carries its tag
    assert second.lookup(manifest.key).manifest == manifest  # every local blob is where lookup looks
    restored = tmp_path / "b" / "restored"
    second.restore(got, restored)
    assert hash_tree(restored).digest == manifest.digest
    assert os.stat(second.blob_path(next(e for e in got.files if e.executable))).st_mode & 0o777 == 0o555


def test_fetch_of_an_unknown_key_is_none(s3: S3Bucket, tmp_path: Path) -> None:
    assert fetch_entry(store_of(s3), "ab" * 32, lambda e: tmp_path / e.digest) is None


def test_a_corrupted_remote_blob_is_a_remote_miss(s3: S3Bucket, tmp_path: Path) -> None:
    cache, manifest = saved_entry(tmp_path)
    store = store_of(s3)
    push_entry(store, manifest, cache.blob_path)
    victim = next(e for e in manifest.files if e.path == "model.bin")
    s3.raw.put_object(Bucket=s3.name, Key=f"pipe/{blob_key(victim.digest)}", Body=b"garbage")
    dest = tmp_path / "b"
    with pytest.raises(RemoteMiss, match=rf"remote cache entry {manifest.key[:12]} .* is damaged \(.*corrupt"):
        fetch_entry(store, manifest.key, lambda e: dest / e.digest)
    assert not (dest / victim.digest).exists()
    assert not store.exists(blob_key(victim.digest))  # the useless object is gone from the server
    healed = push_entry(store, manifest, cache.blob_path)  # the re-run's push (the manifest is there already)
    assert (healed.files, healed.manifest_written) == (1, False)
    assert fetch_entry(store, manifest.key, lambda e: dest / e.digest) is not None


def test_a_deleted_remote_blob_is_a_remote_miss(s3: S3Bucket, tmp_path: Path) -> None:
    cache, manifest = saved_entry(tmp_path)
    store = store_of(s3)
    push_entry(store, manifest, cache.blob_path)
    victim = next(e for e in manifest.files if e.path == "run.sh")
    store.delete([blob_key(victim.digest)])
    with pytest.raises(RemoteMiss, match="does not exist"):
        fetch_entry(store, manifest.key, lambda e: tmp_path / "b" / e.digest)
    assert push_entry(store, manifest, cache.blob_path).files == 1  # the re-run's push re-uploads it
    assert fetch_entry(store, manifest.key, lambda e: tmp_path / "b" / e.digest) is not None


def test_a_damaged_remote_manifest_is_a_remote_miss(s3: S3Bucket, tmp_path: Path) -> None:
    store = store_of(s3)
    key = "cd" * 32
    store.put_bytes(manifest_key(key), b"{not json")
    with pytest.raises(RemoteMiss, match="unreadable manifest"):
        fetch_entry(store, key, lambda e: tmp_path / e.digest)


def test_a_failed_blob_upload_writes_no_manifest(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, manifest = saved_entry(tmp_path)
    store = store_of(s3)
    real_put_file = store.put_file

    def put_file(key: str, path: Path) -> None:
        if path.stat().st_size < 100:  # the small blobs fail: the server went away mid-push
            raise RemoteError("remote: cannot reach the server")
        real_put_file(key, path)

    monkeypatch.setattr(store, "put_file", put_file)
    with pytest.raises(RemoteError):
        push_entry(store, manifest, cache.blob_path, workers=1)
    assert not any(k.startswith("pipe/manifests/") for k in s3.object_keys())
