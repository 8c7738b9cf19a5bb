"""remote's layout and objectstore's pure helpers (URL parsing, bounded_map); no server needed."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from orchestrator.cache import Manifest
from orchestrator.cachekey import Ingredients
from orchestrator.errors import ExitCode, RemoteError
from orchestrator.hashing import FileEntry
from orchestrator.objectstore import ObjectStore, bounded_map
from orchestrator.remote import blob_key, blobs_of, manifest_key

D1, D2 = "ab" + "1" * 62, "cd" + "2" * 62


def manifest(*files: FileEntry) -> Manifest:
    ing = Ingredients(
        image="sha256:" + "1" * 64, command=None, entrypoint=None, workdir="/", env={}, params={}, inputs={},
        upstream={},
    )
    return Manifest("ef" * 32, "0" * 64, files, ing, datetime(2026, 1, 1, tzinfo=UTC), "run-1", "train")


def test_blobs_are_sharded_by_the_first_two_hex_digits() -> None:
    assert blob_key(D1) == f"blobs/ab/{D1}"


def test_manifests_are_named_by_key() -> None:
    assert manifest_key("ef" * 32) == f"manifests/{'ef' * 32}.json"


@pytest.mark.parametrize("bad", ["", "../x", "AB12", "ab/cd", "zz"])
def test_a_digest_or_key_that_is_not_lower_hex_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        blob_key(bad)
    with pytest.raises(ValueError):
        manifest_key(bad)


def test_one_blob_per_content_and_none_for_symlinks() -> None:
    m = manifest(
        FileEntry("a", 10, D1, False),
        FileEntry("b", 10, D1, True),  # same content, executable: the bit lives in the manifest
        FileEntry("c", 5, D2, False),
        FileEntry("link", 0, "ee" * 32, False, link="a"),
    )
    assert sorted(blobs_of(m)) == [D1, D2]


def test_the_manifest_json_is_the_local_caches_own() -> None:
    m = manifest(FileEntry("a", 10, D1, False))
    assert Manifest.from_json(m.to_json().encode("utf-8")) == m


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [("s3://b/p/", "b", "p/"), ("s3://b/p", "b", "p/"), ("s3://b/a/b/", "b", "a/b/"), ("s3://b", "b", "")],
)
def test_the_url_names_bucket_and_prefix(url: str, bucket: str, prefix: str) -> None:
    store = ObjectStore(url, "http://127.0.0.1:9")  # builds a client; sends nothing
    assert (store.bucket, store.prefix, store.url) == (bucket, prefix, f"s3://{bucket}/{prefix}")


@pytest.mark.parametrize("url", ["http://b/p/", "s3:///p/", "b/p"])
def test_a_url_that_is_not_s3_is_a_remote_error(url: str) -> None:
    with pytest.raises(RemoteError, match="not an s3://bucket/prefix/ URL") as caught:
        ObjectStore(url)
    assert caught.value.exit_code == ExitCode.INFRA


def test_a_key_leaving_the_prefix_is_refused() -> None:
    store = ObjectStore("s3://b/p/", "http://127.0.0.1:9")
    with pytest.raises(ValueError):
        store._full("../other/k")


def test_bounded_map_keeps_order_and_the_bound() -> None:
    running, peak = 0, 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return i * 2

    assert bounded_map(work, range(20), 3) == [i * 2 for i in range(20)]
    assert 1 < peak <= 3


def test_bounded_map_raises_the_first_error_and_starts_no_more() -> None:
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        if i == 0:
            raise RemoteError("remote s3://b/p/: access denied (check AWS credentials)")
        time.sleep(0.01)
        return i

    with pytest.raises(RemoteError, match="access denied"):
        bounded_map(work, range(200), 2)
    assert len(started) < 200
