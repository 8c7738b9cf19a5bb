"""An S3-compatible bucket and prefix as a store of immutable objects: the one module that imports boto3.

Knows nothing of manifests, stages or the cache (remote.py lays those out). Keys are relative to the prefix of the
`s3://bucket/prefix/` URL. Credentials come only from the standard chain (environment, shared credentials file,
profile) and are never printed. Every botocore failure leaves as a one-line RemoteError (exit 4) that names the
remote, never a key or secret; a download whose content does not hash to the expected digest is a DigestMismatch,
which callers turn into a warning and a miss. See docs/remote.md for the design and the measurements.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
from blake3 import blake3

from orchestrator.errors import RemoteError
from orchestrator.hashing import hash_file

PART_BYTES = 16 << 20  # multipart part size; S3 needs at least 5 MiB for every part but the last
MULTIPART_MIN_BYTES = 64 << 20  # from here on a file goes up in parts (a single PUT holds ≤ 5 GiB)
PART_WORKERS = 4  # parts of one file in flight at once (each holds one part in memory)
TRANSFER_WORKERS = 8  # files in flight at once in put_many/get_many
READ_BYTES = 1 << 20
DOWNLOAD_ATTEMPTS = 3  # a body that breaks off mid-stream is fetched again (botocore retries only the request)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_T = TypeVar("_T")
_R = TypeVar("_R")


class DigestMismatch(RemoteError):
    """A downloaded object does not hash to its expected digest (corrupt or truncated on the server)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class RemoteUnreachable(RemoteError):
    """The server did not answer (connection refused or timed out): a transient fault, unlike a refusal."""


class ObjectMissing(RemoteError):
    """The object does not exist (get_file); exists() and get_bytes() answer False and None instead."""


@dataclass(frozen=True)
class RemoteObject:
    key: str  # relative to the store's prefix
    size: int
    modified: datetime


class ObjectStore:
    """Objects under `s3://bucket/prefix/`, optionally on an S3-compatible `endpoint` (http or https).

    Thread-safe: one botocore client (which is) is shared by the transfer threads. Retries use botocore's
    'standard' mode (exponential backoff with jitter on throttling, 5xx and connection errors).
    """

    def __init__(
        self,
        url: str,
        endpoint: str | None = None,
        *,
        part_bytes: int = PART_BYTES,
        multipart_min_bytes: int = MULTIPART_MIN_BYTES,
        max_attempts: int = 5,
        connect_timeout: float = 10,
        read_timeout: float = 60,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise RemoteError(f"remote {url}: not an s3://bucket/prefix/ URL")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self.endpoint = endpoint
        self.part_bytes = max(part_bytes, 5 << 20)
        self.multipart_min_bytes = max(multipart_min_bytes, self.part_bytes)
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=TRANSFER_WORKERS * PART_WORKERS,
            # our blake3 check covers integrity end to end; the new default CRC trailers are refused by older
            # S3-compatible servers (radosgw 16.2 among them for streamed parts)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint else None,
        )
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no probe of a link-local metadata address
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"
        # plain http has no TLS to verify: verify=False keeps an AWS_CA_BUNDLE from the host out of the way
        verify = False if endpoint and endpoint.startswith("http://") else None
        self._bucket_seen = False
        self._client: Any = session.client(
            "s3", endpoint_url=endpoint, region_name=region, config=config, verify=verify
        )

    # -- single objects ------------------------------------------------------------------------------------

    def check(self) -> None:
        """RemoteError unless the bucket exists and the credentials may use it (one request)."""
        try:
            self._call("check", "", self._client.head_bucket, Bucket=self.bucket)
        except ObjectMissing:
            raise RemoteError(f"remote {self.url}: bucket {self.bucket} does not exist") from None
        self._bucket_seen = True

    def exists(self, key: str) -> bool:
        try:
            self._call("check", key, self._client.head_object, Bucket=self.bucket, Key=self._full(key))
        except ObjectMissing:
            if not self._bucket_seen:  # a HEAD's 404 has no body: it may mean the bucket, not the key
                self.check()
            return False
        return True

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("upload", key, self._client.put_object, Bucket=self.bucket, Key=self._full(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        """The object's content, or None when it does not exist (for small objects such as manifests)."""
        try:
            response = self._call("download", key, self._client.get_object, Bucket=self.bucket, Key=self._full(key))
        except ObjectMissing:
            return None
        return self._read_body(key, lambda: bytes(response["Body"].read()))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Writes `data` under `key` unless an object is there already; True when this call wrote it.

        A conditional PUT (If-None-Match: *): the server refuses a second writer with 412, so two machines
        racing on a key leave exactly one whole object. A server that does not implement the condition (501 or
        400 NotImplemented) gets head-then-put-then-read-back instead: a racing writer may overwrite ours, which
        is safe for pipe's manifests because every manifest of a key is a valid entry whose blobs were all
        uploaded before it, and a PUT is atomic, so a reader sees one whole manifest or none. The read-back tells
        which writer won.
        """
        full = self._full(key)
        try:
            self._call("upload", key, self._client.put_object, Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
            return True
        except _PreconditionFailed:
            return False
        except _NotImplemented:
            pass
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return self.get_bytes(key) == data

    def put_file(self, key: str, path: Path) -> None:
        """Uploads a file without holding it in memory: one PUT, or multipart from multipart_min_bytes on.

        A multipart upload that fails is aborted, so no object and no stray parts are left; an object appears
        only when complete. A file that changes size while it is read is an error, never a short object.
        """
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise RemoteError(f"cannot read {path}: {e.strerror or e}") from e
        if size < self.multipart_min_bytes:
            try:
                with open(path, "rb") as f:
                    self._call(
                        "upload", key, self._client.put_object,
                        Bucket=self.bucket, Key=self._full(key), Body=f, ContentLength=size,
                    )
            except OSError as e:
                raise RemoteError(f"cannot read {path}: {e.strerror or e}") from e
            return
        self._put_multipart(key, path, size)

    def get_file(self, key: str, dest: Path, expected_digest: str) -> None:
        """Streams the object to a temporary file beside `dest`, checks its blake3 digest, then renames it.

        DigestMismatch when the content is not `expected_digest` (dest untouched); ObjectMissing when there is
        no such object; RemoteError when the transfer fails. dest's folder is created.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            response = self._call("download", key, self._client.get_object, Bucket=self.bucket, Key=self._full(key))
            size = int(response.get("ContentLength", 0))

            def stream() -> str:
                hasher = blake3()
                with open(tmp, "wb") as f:
                    for chunk in response["Body"].iter_chunks(READ_BYTES):
                        hasher.update(chunk)
                        f.write(chunk)
                return str(hasher.hexdigest())

            if size >= self.multipart_min_bytes:  # ranges on PART_WORKERS threads, then hash the file
                response["Body"].close()
                self._get_ranges(key, tmp, size)
                actual = hash_file(tmp)
            else:
                actual = self._read_body(key, stream)
            if actual != expected_digest:
                raise DigestMismatch(
                    f"remote {self.url}: {key} is corrupt (its content hashes to {actual[:12]}, "
                    f"not {expected_digest[:12]})",
                    key,
                )
            os.replace(tmp, dest)
        except OSError as e:
            raise RemoteError(f"cannot write {dest}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[RemoteObject]:
        """Every object whose key starts with `prefix`, sorted by key."""
        found = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full(prefix)):
                for item in page.get("Contents", ()):
                    found.append(RemoteObject(item["Key"][len(self.prefix):], item["Size"], item["LastModified"]))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._mapped("list", prefix, e) from None
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys: Iterable[str]) -> None:
        todo = [{"Key": self._full(k)} for k in keys]
        for start in range(0, len(todo), 1000):  # DeleteObjects takes at most 1,000 keys
            response = self._call(
                "delete", "", self._client.delete_objects,
                Bucket=self.bucket, Delete={"Objects": todo[start:start + 1000], "Quiet": True},
            )
            if errors := response.get("Errors"):
                first = errors[0]
                raise RemoteError(
                    f"remote {self.url}: cannot delete {len(errors)} object(s), "
                    f"{first.get('Key', '')[len(self.prefix):]}: {first.get('Code', 'error')}"
                )

    # -- signed requests, for a client without credentials (the kubernetes executor's in-pod agent) -------

    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL that GETs `key` without credentials until it expires."""
        return str(self._call("sign", key, self._client.generate_presigned_url, ClientMethod="get_object",
                              Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires_s))

    def presign_post(self, key: str, expires_s: int) -> tuple[str, dict[str, str]]:
        """A URL and form fields that upload `key` by a multipart POST (an HTML-form upload, which a client as
        small as busybox wget can send) without credentials until it expires."""
        post = self._call("sign", key, self._client.generate_presigned_post, Bucket=self.bucket,
                          Key=self._full(key), ExpiresIn=expires_s)
        return str(post["url"]), {str(k): str(v) for k, v in post["fields"].items()}

    def fetch_file(self, key: str, dest: Path) -> None:
        """Streams the object into `dest` (no digest to check: for transfers pipe did not hash itself)."""
        response = self._call("download", key, self._client.get_object, Bucket=self.bucket, Key=self._full(key))

        def stream() -> None:
            with open(dest, "wb") as f:
                f.writelines(response["Body"].iter_chunks(READ_BYTES))

        self._read_body(key, stream)

    # -- many objects --------------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Path]], workers: int = TRANSFER_WORKERS,
                 on_file: Callable[[int], None] | None = None) -> None:
        """put_file for each (key, path), at most `workers` at once; the first error is raised after the others
        have stopped (transfers not yet started are not begun). on_file(size) after each file sent."""

        def put(item: tuple[str, Path]) -> None:
            self.put_file(*item)
            if on_file is not None:
                on_file(item[1].stat().st_size)

        bounded_map(put, items, workers)

    def get_many(self, items: Sequence[tuple[str, Path, str]], workers: int = TRANSFER_WORKERS,
                 on_file: Callable[[int], None] | None = None) -> None:
        """get_file for each (key, dest, expected_digest), at most `workers` at once; first error raised.
        on_file(size) after each file received."""

        def get(item: tuple[str, Path, str]) -> None:
            self.get_file(*item)
            if on_file is not None:
                on_file(item[1].stat().st_size)

        bounded_map(get, items, workers)

    # -- internals -----------------------------------------------------------------------------------------

    def _put_multipart(self, key: str, path: Path, size: int) -> None:
        full = self._full(key)
        upload = self._call("upload", key, self._client.create_multipart_upload, Bucket=self.bucket, Key=full)
        upload_id = upload["UploadId"]
        offsets = list(range(0, size, self.part_bytes))
        try:
            with open(path, "rb") as f:
                fd = f.fileno()

                def send(index: int) -> dict[str, Any]:
                    length = min(self.part_bytes, size - offsets[index])
                    body = self._read_part(fd, offsets[index], length)
                    if len(body) != length:
                        raise RemoteError(f"cannot upload {path}: it changed size while being read")
                    part = self._call(
                        "upload", key, self._client.upload_part, Bucket=self.bucket, Key=full,
                        UploadId=upload_id, PartNumber=index + 1, Body=body,
                    )
                    return {"PartNumber": index + 1, "ETag": part["ETag"]}

                parts = bounded_map(send, range(len(offsets)), PART_WORKERS)
            self._call(
                "upload", key, self._client.complete_multipart_upload, Bucket=self.bucket, Key=full,
                UploadId=upload_id, MultipartUpload={"Parts": parts},
            )
        except BaseException as e:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                pass  # unreachable now: a lifecycle rule or `pipe cache gc --remote` removes stray parts
            if isinstance(e, OSError):
                raise RemoteError(f"cannot read {path}: {e.strerror or e}") from e
            raise

    def _get_ranges(self, key: str, tmp: Path, size: int) -> None:
        """Fetches the object in part_bytes ranges, at most PART_WORKERS at once, each written at its offset.
        An object replaced meanwhile mixes two contents: the caller's digest check refuses that."""
        full = self._full(key)
        with open(tmp, "wb") as f:
            f.truncate(size)
            fd = f.fileno()

            def fetch(offset: int) -> None:
                last = min(offset + self.part_bytes, size) - 1
                part = self._call(
                    "download", key, self._client.get_object, Bucket=self.bucket, Key=full,
                    Range=f"bytes={offset}-{last}",
                )

                def write() -> int:
                    position = offset
                    for chunk in part["Body"].iter_chunks(READ_BYTES):
                        os.pwrite(fd, chunk, position)
                        position += len(chunk)
                    return position

                if self._read_body(key, write) != last + 1:
                    raise RemoteError(f"remote {self.url}: {key} came back short (the object changed?)")

            bounded_map(fetch, range(0, size, self.part_bytes), PART_WORKERS)

    @staticmethod
    def _read_part(fd: int, offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    def _read_body(self, key: str, read: Callable[[], _T]) -> _T:
        try:
            return read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._mapped("download", key, e) from None

    def _full(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a relative object key: {key!r}")
        return self.prefix + key

    def _call(self, action: str, key: str, method: Callable[..., _R], **kwargs: Any) -> _R:
        try:
            return method(**kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise self._mapped(action, key, e) from None

    def _mapped(self, action: str, key: str, error: Exception) -> RemoteError:
        """One line naming the remote; botocore's own text is left out (it can carry request details)."""
        where = f"remote {self.url}"
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            return RemoteError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
        if isinstance(error, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
            return RemoteUnreachable(f"{where}: cannot reach {self.endpoint or 'S3'} (connection failed)")
        if isinstance(error, botocore.exceptions.ReadTimeoutError):
            return RemoteUnreachable(f"{where}: {self.endpoint or 'S3'} did not answer in time")
        if isinstance(error, botocore.exceptions.ConnectionError):  # reset or closed mid-request
            return RemoteUnreachable(f"{where}: the connection to {self.endpoint or 'S3'} failed")
        if not isinstance(error, botocore.exceptions.ClientError):
            return RemoteError(f"{where}: {action} failed ({type(error).__name__})")
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _DENIED or status == 403:
            return RemoteError(f"{where}: access denied (check AWS credentials)")
        if code == "NoSuchBucket":
            return RemoteError(f"{where}: bucket {self.bucket} does not exist")
        if code in _MISSING or status == 404:
            return ObjectMissing(f"{where}: {key} does not exist")
        if code == "PreconditionFailed" or status == 412:
            return _PreconditionFailed(f"{where}: {key} exists")
        if code == "NotImplemented" or status == 501:
            return _NotImplemented(f"{where}: the server does not implement this request")
        return RemoteError(f"{where}: {action} of {key or 'objects'} failed ({code or status})")


class _PreconditionFailed(RemoteError):
    pass


class _NotImplemented(RemoteError):
    pass


def bounded_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> list[_R]:
    """fn over items on at most `workers` threads, results in order. On the first error the items not yet
    started are skipped, the running ones finish, and that error is raised."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    failed = threading.Event()

    def guarded(item: _T) -> _R | None:
        if failed.is_set():
            return None
        try:
            return fn(item)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(guarded, item) for item in items]
    for future in futures:  # the pool has joined: every future is done
        if (error := future.exception()) is not None:
            raise error
    return [future.result() for future in futures]  # type: ignore[misc]  # none is None: none failed
