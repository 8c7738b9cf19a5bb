"""Every error shown to a user, one hierarchy under PipeError, and the exit codes.

str(error) is the whole one-line message; the CLI adds the `error:` prefix. Imports nothing from the package.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """What `pipe` exits with; documented in README.md. A run exits with its most severe outcome."""

    SUCCESS = 0
    FAILED = 1  # a stage failed (non-zero exit, OOM, timeout, gate)
    INVALID = 2  # nothing ran: bad file or arguments, missing image, failed build
    LOCKED = 3  # another run of this pipeline holds the lock
    INFRA = 4  # the engine, the disk or the database failed, not the stage
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM


class PipeError(Exception):
    """Base of every error shown to a user; str(e) is the whole one-line message."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str) -> None:
        assert message, "a PipeError needs a message"
        super().__init__(message)


class SpecError(PipeError):
    """The pipeline file is invalid; names the file, the line and the dotted key."""

    exit_code = ExitCode.INVALID

    def __init__(self, file: Path | str, line: int | None, key: str, problem: str) -> None:
        super().__init__(f"{file}:{line or '?'}: {key}: {problem}")
        self.file, self.line, self.key, self.problem = Path(file), line, key, problem


class UsageError(PipeError):
    """The command line asks for something impossible (an unknown stage, a missing upstream output)."""

    exit_code = ExitCode.INVALID


class ImageError(PipeError):
    """A missing image or a failed build, found before any stage starts."""

    exit_code = ExitCode.INVALID


class EngineError(PipeError):
    """The Docker engine is unreachable or refused a request: an infrastructure fault, not a stage failure."""

    exit_code = ExitCode.INFRA


class StoreError(PipeError):
    """The history database cannot be opened or written (for example, it is from a newer pipe)."""

    exit_code = ExitCode.INFRA


class LockHeld(PipeError):
    """Another `pipe run` of the same pipeline is running."""

    exit_code = ExitCode.LOCKED


class NotFound(PipeError):
    """A run, stage or log that a command names does not exist."""

    exit_code = ExitCode.INVALID


class RemoteError(PipeError):
    """The remote object store refused or failed a request (credentials, bucket, network): one line, no secret."""

    exit_code = ExitCode.INFRA


class ServeError(PipeError):
    """Serving failed: a new model never became healthy (the old one keeps serving), or nothing can be served."""

    exit_code = ExitCode.FAILED
