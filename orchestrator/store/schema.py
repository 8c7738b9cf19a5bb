"""The history's schema version and what a database's version means to this pipe: no SQLAlchemy here, so the
standard-library reader (sqlite_reader.py) and db.py judge a database alike, in the same words."""

from __future__ import annotations

from orchestrator.errors import StoreError

SCHEMA_VERSION = 6
BUSY_TIMEOUT_MS = 10_000  # how long a read or write waits for another process's lock


def check_version(version: int | None, name: str) -> None:
    """StoreError for a database that is not pipe's (None: tables but no schema_version) or is newer."""
    if version is None:
        raise StoreError(f"database {name} holds tables but no schema_version; it is not a pipe database")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database {name} has schema v{version} but this pipe knows v{SCHEMA_VERSION}; upgrade pipe")


def check_readable(version: int | None, name: str) -> int:
    """The version of a database opened read-only: SCHEMA_VERSION, or 0 when it is empty; StoreError for one
    that a read cannot use (an older one needs one `pipe run`, which upgrades it)."""
    check_version(version, name)
    if version not in (0, SCHEMA_VERSION):
        raise StoreError(f"history {name} is schema v{version}; run `pipe run` once to upgrade it "
                         f"to v{SCHEMA_VERSION}")
    return version or 0


def signed64(value: int) -> int:
    """The signed 64-bit integer with the same bits: how file_hash stores st_dev and st_ino, which are unsigned
    and may exceed 2**63 (both backends' BIGINT is signed)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned64(value: int) -> int:
    """signed64 undone: the stat value a file_hash row was written from."""
    return value + (1 << 64) if value < 0 else value
