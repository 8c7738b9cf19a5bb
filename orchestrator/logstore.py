"""Where a stage's log is read from: the LogStore seam, so that `pipe logs` (and `-f`) need not know where the
stage ran. A log is named by the reference history recorded for it (StageRunInfo.log_path): a path on this host
for the local store; an executor that runs stages elsewhere records its own references and brings a LogStore
that reads them (an object store, a cluster's API). Pure protocol and the local implementation; no library.
"""

from __future__ import annotations

from typing import Protocol

CHUNK = 1 << 16


class LogStore(Protocol):
    def read(self, ref: str, offset: int, limit: int = CHUNK) -> bytes | None:
        """Up to `limit` bytes of log `ref` from `offset`: b"" at its end for now (a running stage's log grows),
        None while it does not exist."""
        ...


class LocalLogStore:
    """Logs as files on this host (runs/<run-id>/<stage>.log): `ref` is the file's path."""

    def read(self, ref: str, offset: int, limit: int = CHUNK) -> bytes | None:
        try:
            with open(ref, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return None
