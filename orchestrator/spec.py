"""Frozen pydantic models of pipeline.yaml: the user's contract, with units parsed at the edge.

Knows nothing of YAML, files or line numbers: loader.py turns a file into these models and keeps the key -> line
map (Source) that later checks use to raise SpecError with a line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from orchestrator import units
from orchestrator.errors import SpecError

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
StageName = Annotated[str, Field(pattern=NAME_PATTERN)]
Seconds = Annotated[float, BeforeValidator(units.parse_duration)]
Bytes = Annotated[int, BeforeValidator(units.parse_memory)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
RetryOn = Literal["error", "oom", "timeout"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Build(_Model):
    """A Docker build context, relative to pipeline.yaml. `build: stages/data` is short for {context: ...}."""

    context: str
    dockerfile: str = "Dockerfile"
    args: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"context": data} if isinstance(data, str) else data


class Resources(_Model):
    """Caps for one container. None means the pipeline's `defaults:` (and then no cap)."""

    cpus: Annotated[float, Field(gt=0)] | None = None
    memory: Bytes | None = None
    gpus: Annotated[int, Field(ge=0)] = 0
    pids: Annotated[int, Field(gt=0)] | None = None


class Gate(_Model):
    """A quality gate on one metric of the stage's metrics file, checked against history."""

    metric: str
    min: float | None = None
    max: float | None = None
    max_drop: Annotated[float, Field(ge=0)] | None = None


class Stage(_Model):
    image: str | None = None
    build: Build | None = None
    command: tuple[str, ...] | str | None = None  # None: the image's own CMD
    entrypoint: tuple[str, ...] | None = None
    inputs: tuple[str, ...] = ()
    needs: tuple[StageName, ...] = ()
    params: dict[str, Any] = {}
    env: dict[EnvName, str] = {}
    secrets: tuple[EnvName, ...] = ()
    resources: Resources = Resources()
    timeout: Seconds | None = None
    retries: Annotated[int, Field(ge=0, le=100)] = 0
    retry_delay: Seconds = 1.0
    retry_on: tuple[RetryOn, ...] = ("error",)
    cache: bool = True
    metrics: str | None = None  # a JSON file inside /outputs
    gate: Gate | None = None
    user: str | None = None  # default: the invoking user's uid:gid; "root" only when asked
    network: bool = False

    @model_validator(mode="after")
    def _one_image_source(self) -> Self:
        if (self.image is None) == (self.build is None):
            raise ValueError("set exactly one of 'image' or 'build'")
        if self.gate is not None and self.metrics is None:
            raise ValueError("'gate' needs 'metrics' (the JSON file the gate reads)")
        return self

    def argv(self) -> tuple[str, ...] | None:
        """The command as an argv: a string runs under /bin/sh -c, as in a Dockerfile's shell form."""
        if isinstance(self.command, str):
            return ("/bin/sh", "-c", self.command)
        return self.command


class Defaults(_Model):
    """Applied to every stage that does not set its own."""

    resources: Resources = Resources(memory=4 * 1024**3, pids=1024)
    timeout: Seconds | None = None
    tmp_size: Bytes = 256 * 1024**2  # the writable tmpfs at /tmp


class Schedule(_Model):
    cron: str
    timezone: str = "UTC"
    overlap: Literal["skip", "queue", "cancel-running"] = "skip"
    catchup: bool = False


@dataclass(frozen=True)
class Source:
    """Where a Pipeline came from: its file and the line of every dotted key."""

    path: Path
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, key: str) -> int | None:
        """The line of `key`, or of its nearest ancestor that has one."""
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key.rpartition(".")[0]
        return None


class Pipeline(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")] | None = None
    stages: dict[StageName, Stage] = Field(min_length=1)
    defaults: Defaults = Defaults()
    schedule: Schedule | None = None
    secrets_file: str | None = None  # KEY=VALUE lines, outside the repository; the environment wins
    _source: Source = PrivateAttr(default_factory=lambda: Source(Path("pipeline.yaml")))

    @model_validator(mode="after")
    def _needs_exist(self) -> Self:
        for name, stage in self.stages.items():
            for up in stage.needs:
                if up not in self.stages:
                    raise ValueError(f"stages.{name}.needs: unknown stage {up!r}")
        return self

    def with_source(self, source: Source) -> Pipeline:
        self._source = source
        return self

    @property
    def source(self) -> Source:
        return self._source

    @property
    def path(self) -> Path:
        return self._source.path

    @property
    def root(self) -> Path:
        """The folder of pipeline.yaml: inputs and build contexts are relative to it."""
        return self._source.path.parent

    @property
    def display_name(self) -> str:
        return self.name or re.sub(r"[^A-Za-z0-9_.-]", "-", self.root.resolve().name) or "pipeline"

    def error(self, key: str, problem: str) -> SpecError:
        """A SpecError for a check made after parsing; keeps the line of `key`."""
        return SpecError(self.path, self._source.line_of(key), key, problem)

    def resources_of(self, name: str) -> Resources:
        """The stage's caps with the pipeline defaults filled in."""
        own, default = self.stages[name].resources, self.defaults.resources
        return Resources(
            cpus=own.cpus if own.cpus is not None else default.cpus,
            memory=own.memory if own.memory is not None else default.memory,
            gpus=own.gpus,
            pids=own.pids if own.pids is not None else default.pids,
        )

    def timeout_of(self, name: str) -> float | None:
        own = self.stages[name].timeout
        return own if own is not None else self.defaults.timeout
