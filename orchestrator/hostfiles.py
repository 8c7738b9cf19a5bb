"""What a stage's container needs and leaves on the host, without Docker: its secrets as files on a tmpfs, the
redaction of their values from its output, and its stored log, capped in size (issue 6); StageLogSink puts the
three together for an executor that receives the output as chunks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Self

from orchestrator.executor import SecretFile
from orchestrator.units import format_bytes

LOG_CAP_BYTES = 10 * 1024**2  # the stored log per attempt; the terminal still sees every line
LINE_CAP_BYTES = 64 * 1024  # a longer "line" is passed on in pieces, so memory stays bounded
TAIL_LINES = 20  # of a stage's output, kept by every executor to explain a failure (ENOSPC, the agent's error)
MIN_SECRET_LINE = 4  # shorter lines of a multi-line secret are not redacted


def redactions(secrets: Sequence[SecretFile]) -> list[bytes]:
    """What to redact from a stage's output, longest first: each value, and for a multi-line one (a PEM key)
    each of its lines, since output is redacted line by line; lines under MIN_SECRET_LINE characters of a
    multi-line value are left alone: they hide nothing, and redacting them would garble the log."""
    found: set[str] = set()
    for secret in secrets:
        lines = [line.strip() for line in secret.value.splitlines()]
        if len(lines) == 1:
            found.add(lines[0])
        else:
            found.update(line for line in lines if len(line) >= MIN_SECRET_LINE)
    return sorted((value.encode() for value in found if value), key=len, reverse=True)


def redact(data: bytes, secrets: Sequence[bytes]) -> bytes:
    for value in secrets:
        data = data.replace(value, b"***")
    return data


def parse_owner(user: str) -> tuple[int, int] | None:
    """ "1000:1000" -> (1000, 1000); "" or "root" -> (0, 0); a user name -> None (its uid is inside the image)."""
    name, _, group = user.partition(":")
    if name in ("", "root"):
        name = "0"
    if not name.isdigit() or (group and not group.isdigit()):
        return None
    return int(name), int(group or 0)


@contextmanager
def secrets_dir(secrets: Sequence[SecretFile], owner: tuple[int, int] | None) -> Iterator[Path | None]:
    """A fresh folder on a host tmpfs with one 0400 file per secret, owned by the container's user; removed after.

    The outer folder is 0700 and private to pipe's user; the inner one is what the container sees at /run/secrets.
    When its uid cannot be given the files (a named user, or pipe not root), they are 0444 instead: still
    unreadable for other host users behind the 0700 folder.
    """
    if not secrets:
        yield None
        return
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    outer = Path(tempfile.mkdtemp(prefix="pipe-secrets-", dir=base))
    try:
        inner = outer / "secrets"
        inner.mkdir(mode=0o700)
        chown = owner is not None and (owner[0] == os.getuid() or os.geteuid() == 0)
        for secret in secrets:
            if not secret.name or "/" in secret.name or secret.name.startswith("."):
                raise ValueError(f"unsafe secret name {secret.name!r}")
            path = inner / secret.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secret.value)
            if chown and owner is not None:
                os.chown(path, *owner)
            path.chmod(0o400 if chown else 0o444)
        if chown and owner is not None:
            os.chown(inner, *owner)
        inner.chmod(0o500 if chown else 0o555)
        yield inner
    finally:
        remove_secrets(outer)


def remove_secrets(outer: Path) -> None:
    """Remove a secrets folder made by secrets_dir. Its inner folder is read-only (0500/0555), which stops
    even its owner from deleting the files in it, so it is made writable first (its owner, or root, may)."""
    with suppress(OSError):
        (outer / "secrets").chmod(0o700)
    shutil.rmtree(outer, ignore_errors=True)


class CappedLog:
    """Appends lines to a file up to LOG_CAP_BYTES, then one marker line; a no-op without a path."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._file: BinaryIO | None = None
        self._written = 0
        self._truncated = False

    def __enter__(self) -> Self:
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "ab")  # closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            with suppress(OSError):  # a full disk: the stage's outcome stands (its tail names ENOSPC)
                self._file.close()

    def write(self, line: str) -> None:
        if self._file is None or self._truncated:
            return
        data = line.encode("utf-8") + b"\n"
        try:
            if self._written + len(data) > LOG_CAP_BYTES:
                self._file.write(f"[pipe: log truncated after {format_bytes(LOG_CAP_BYTES)}]\n".encode())
                self._truncated = True
                return
            self._file.write(data)
        except OSError:  # the disk is full: stop storing, keep streaming; not an engine fault
            self._truncated = True
            return
        self._written += len(data)

    def flush(self) -> None:
        if self._file is None or self._truncated:
            return
        try:
            self._file.flush()
        except OSError:  # the disk is full: as in write
            self._truncated = True


class StageLogSink:
    """A stage's output as it arrives, in chunks cut anywhere, turned into lines: each redacted (a secret split
    across two chunks too), then kept in `tail`, appended to the capped log and passed to `on_output`. A line
    longer than LINE_CAP_BYTES is passed on in pieces, cut only where no secret can straddle the cut (the
    longest secret's length is held back). `streams` partial lines are kept apart (stdout, stderr).

        with CappedLog(path) as log:
            sink = StageLogSink(log, redactions(spec.secrets), on_output, tail)
            for chunk in chunks: sink.feed(chunk)   # then sink.flush() whenever a read returns
            sink.close()                             # the last partial lines
    """

    def __init__(self, log: CappedLog, secrets: Sequence[bytes], on_output: Callable[[str], None],
                 tail: MutableSequence[str] | None = None, streams: int = 1) -> None:
        self._log, self._secrets, self._on_output, self._tail = log, secrets, on_output, tail
        self._hold = max(map(len, secrets), default=0)
        self._partial = [b""] * streams

    def _emit(self, raw: bytes) -> None:
        line = redact(raw, self._secrets).decode("utf-8", errors="replace").rstrip("\r")
        if self._tail is not None:
            self._tail.append(line)
        self._log.write(line)
        self._on_output(line)

    def feed(self, chunk: bytes, stream: int = 0) -> None:
        if not chunk:
            return
        *lines, rest = (self._partial[stream] + chunk).split(b"\n")
        for raw in lines:
            self._emit(raw)
        while len(rest) > LINE_CAP_BYTES + self._hold:  # a secret begun before the cut is whole in rest
            rest = redact(rest, self._secrets)
            self._emit(rest[:LINE_CAP_BYTES])
            rest = rest[LINE_CAP_BYTES:]
        self._partial[stream] = rest

    def flush(self) -> None:
        """Make what was written so far visible to `pipe logs -f` (per read, not per line)."""
        self._log.flush()

    def close(self) -> None:
        """Pass on each stream's last line, which had no newline."""
        for i, rest in enumerate(self._partial):
            if rest:
                self._emit(rest)
            self._partial[i] = b""


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
