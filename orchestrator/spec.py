"""Frozen pydantic models of pipeline.yaml: the user's contract, with units parsed at the edge.

Knows nothing of YAML, files or line numbers: loader.py turns a file into these models and keeps the
key -> line map (Source) that later checks use to raise SpecError with a line.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator import units
from orchestrator.errors import SpecError

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
PIPELINE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MIN_MEMORY = 6 * 1024**2  # the engine refuses a smaller memory cap
# What the JSON Schema says of strings the loader parses (units.py): a first filter for editors, no more.
MEMORY_PATTERN = r"^\s*\d+(\.\d+)?\s*([kmgtKMGT]([iI]?[bB])?|[bB])?\s*$"
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?\s*([mM][sS]|[sSmMhHdD])\s*)+)$"
RELATIVE_PATH_PATTERN = r"^(?!\s*$)(?!/)(?!\.\.(/|$))"
# s3://bucket or s3://bucket/prefix/ (S3's bucket-name rules, a prefix of safe path segments)
REMOTE_URL_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()-]+)*/?$"
ENDPOINT_PATTERN = r"^https?://[^\s/?#@]+(/[^\s?#@]*)?$"  # no user:password@: credentials never go in the file  # not blank, not absolute, not leaving by a leading ..
SCHEMA_ID = "https://github.com/pipe-orchestrator/pipe/schema/pipeline.json"
StageName = Annotated[str, Field(pattern=NAME_PATTERN)]


def _duration(value: Any) -> float:
    return units.parse_duration(value)


def _whole_number(value: Any) -> Any:
    """Ints as they are, and 2.0 as 2 (JSON Schema's "integer" takes it too); never true, false or "2"."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected a whole number, got {describe_value(value)}")  # noqa: TRY004 - pydantic reports only ValueError
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The types are strict where pydantic would coerce (network: "yes", retries: "2", cpus: "1.5", gpus: true), so
# the loader and the JSON Schema that `pipe schema` prints give every document the same verdict.
Seconds = Annotated[
    float,
    BeforeValidator(_duration, json_schema_input_type=Annotated[float, Field(gt=0)]
                    | Annotated[str, Field(pattern=DURATION_PATTERN)]),
]
Bytes = Annotated[
    int,
    BeforeValidator(units.parse_memory, json_schema_input_type=Annotated[int, Field(gt=0)]
                    | Annotated[str, Field(pattern=MEMORY_PATTERN)]),
]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]
RetryOn = Literal["error", "oom", "timeout", "node_lost"]
RelativePath = Annotated[str, Field(json_schema_extra={"pattern": RELATIVE_PATH_PATTERN})]  # checked by _relative_path


def describe_value(value: object) -> str:
    """How an error message names a value the user wrote: "a mapping", "the string 'x'", "3", "nothing"."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return f"the string {value[:40] + '...' if len(value) > 40 else value!r}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    return repr(value)


def non_finite_at(value: object, at: str = "") -> str | None:
    """The dotted place of the first NaN or infinity in a params value ("" for the value itself), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return at
    children: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if (found := non_finite_at(child, f"{at}.{key}" if at else str(key))) is not None:
            return found
    return None


def keyed_error(key: str, problem: str, at: str = "") -> PydanticCustomError:
    """A validation error about `key` (dotted, relative to the model being validated, may be empty).

    The loader appends `key` to pydantic's location to name the key and takes the line of `at` (default:
    `key`), so a check that spans fields, such as an unknown stage in `needs`, still points at the right line.
    """
    return PydanticCustomError("pipe_spec", "{problem}", {"key": key, "at": at or key, "problem": problem})


def _command(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and all(isinstance(part, str) for part in value):
        if not value:
            raise ValueError("empty command: leave the key out to run the image's own command")
        return tuple(value)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty command: leave the key out to run the image's own command")
        return value
    raise ValueError(f"expected a string or a list of strings, got {describe_value(value)}")


def _build(value: Any) -> Any:
    if isinstance(value, str):
        return {"context": value}
    if value is None or isinstance(value, (dict, Build)):
        return value
    raise ValueError(
        "expected a string (the build context) or a mapping with context, dockerfile, args, "
        f"got {describe_value(value)}"
    )


def _relative_path(value: str, what: str) -> str:
    """`value` normalised ("./data/" -> "data"); refuses empty, absolute and `..` paths."""
    if not value.strip():
        raise ValueError(f"empty path: name a {what}")
    if posixpath.isabs(value):
        raise ValueError(f"{value!r} is absolute: use a path relative to the {what}")
    normal = posixpath.normpath(value)
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"{value!r} leaves the {what}")
    return normal


Command = Annotated[
    tuple[str, ...] | str,
    BeforeValidator(_command, json_schema_input_type=Annotated[list[str], Field(min_length=1)]
                    | Annotated[str, Field(pattern=r"\S")]),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Build(_Model):
    """A Docker build context, relative to pipeline.yaml. `build: stages/data` is short for {context: ...}."""

    context: RelativePath
    dockerfile: str = "Dockerfile"  # relative to the context, as `docker build -f` reads it
    args: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"context": data} if isinstance(data, str) else data

    @field_validator("context")
    @classmethod
    def _context_inside(cls, value: str) -> str:
        return _relative_path(value, "pipeline's folder")


class Resources(_Model):
    """Caps for one container. None means the pipeline's `defaults:` (and then no cap)."""

    cpus: Annotated[Number, Field(gt=0)] | None = None
    memory: Bytes | None = None
    gpus: Annotated[WholeNumber, Field(ge=0)] = 0
    pids: Annotated[WholeNumber, Field(gt=0)] | None = None

    @field_validator("memory")
    @classmethod
    def _memory_at_least_engine_minimum(cls, value: int | None) -> int | None:
        if value is not None and value < MIN_MEMORY:
            raise ValueError(f"{units.format_bytes(value)} is below the engine's minimum of 6 MiB")
        return value


class Gate(_Model):
    """A quality gate on one metric of the stage's metrics file, checked against history."""

    metric: str
    min: Number | None = None
    max: Number | None = None
    max_drop: Annotated[Number, Field(ge=0)] | None = None


class Toleration(_Model):
    """A Kubernetes toleration of a node taint (core/v1 Toleration's fields)."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class KubePlacement(_Model):
    """`kubernetes:` on a stage: where its pod may run (not part of the cache key)."""

    node_selector: dict[str, str] = {}
    tolerations: tuple[Toleration, ...] = ()


class Stage(_Model):
    model_config = ConfigDict(json_schema_extra={
        # _one_image_source, for editors: exactly one of image and build, and gate only with metrics
        "oneOf": [{"required": ["image"], "properties": {"image": {"type": "string"}}},
                  {"required": ["build"], "properties": {"build": {"not": {"type": "null"}}}}],
        "if": {"required": ["gate"], "properties": {"gate": {"type": "object"}}},
        "then": {"required": ["metrics"], "properties": {"metrics": {"type": "string"}}},
    })

    image: Annotated[str, Field(min_length=1)] | None = None
    build: Annotated[Build | None, BeforeValidator(_build, json_schema_input_type=RelativePath | Build | None)] = None
    command: Command | None = None  # None: the image's own CMD; a string runs under /bin/sh -c
    entrypoint: tuple[str, ...] | None = None
    inputs: tuple[RelativePath, ...] = ()
    needs: tuple[StageName, ...] = ()
    params: dict[str, Any] = {}
    env: dict[EnvName, str] = Field({}, json_schema_extra={"additionalProperties": False})
    secrets: tuple[EnvName, ...] = ()
    resources: Resources = Resources()
    timeout: Seconds | None = None
    retries: Annotated[WholeNumber, Field(ge=0, le=100)] = 0
    retry_delay: Seconds = 1.0
    retry_on: tuple[RetryOn, ...] = ("error",)
    cache: StrictBool = True
    metrics: RelativePath | None = None  # a JSON file inside /outputs
    gate: Gate | None = None
    user: str | None = None  # default: the invoking user's uid:gid; "root" only when asked
    network: StrictBool = False
    kubernetes: KubePlacement | None = None  # node selector and tolerations on the kubernetes executor
    constraints: tuple[str, ...] = ()  # swarm placement constraints, added to the executor's

    @field_validator("params")
    @classmethod
    def _params_finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        if (where := non_finite_at(value)) is not None:
            raise keyed_error(where, "not a finite number: JSON (/pipe/params.json) cannot hold NaN or "
                              "infinity; quote it to pass a string")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs_inside(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        normal = tuple(_relative_path(rel, "pipeline's folder") for rel in value)
        if len(set(normal)) != len(normal):
            twice = next(rel for i, rel in enumerate(normal) if rel in normal[:i])
            raise ValueError(f"{twice!r} is listed twice")
        return normal

    @field_validator("metrics")
    @classmethod
    def _metrics_inside_outputs(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value, "stage's /outputs")

    @model_validator(mode="after")
    def _one_image_source(self) -> Self:
        if self.image is not None and self.build is not None:
            raise keyed_error("image", "set either 'image' or 'build', not both")
        if self.image is None and self.build is None:
            raise keyed_error("", "needs 'image' (an existing image) or 'build' (a folder with a Dockerfile)")
        if self.gate is not None and self.metrics is None:
            raise keyed_error("gate", "'gate' needs 'metrics' (the JSON file in /outputs the gate reads)")
        return self

    def argv(self) -> tuple[str, ...] | None:
        """The command as an argv: a string runs under /bin/sh -c, as in a Dockerfile's shell form."""
        if isinstance(self.command, str):
            return ("/bin/sh", "-c", self.command)
        return self.command


_DEFAULT_CAPS = {"memory": 4 * 1024**3, "pids": 1024}


def _with_default_caps(value: Any) -> Any:
    """`defaults: {resources: {cpus: 1}}` keeps the built-in memory and pids caps unless it sets them."""
    return {**_DEFAULT_CAPS, **value} if isinstance(value, dict) else value


class Defaults(_Model):
    """Applied to every stage that does not set its own."""

    resources: Annotated[Resources, BeforeValidator(_with_default_caps)] = Resources(**_DEFAULT_CAPS)
    timeout: Seconds | None = None
    tmp_size: Bytes = 256 * 1024**2  # the writable tmpfs at /tmp


class Schedule(_Model):
    cron: str
    timezone: str = "UTC"
    overlap: Literal["skip", "queue", "cancel-running"] = "skip"
    catchup: StrictBool = False


PUBLISH_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"  # HOST:PORT, loopback unless asked
URL_PATTERN = r"^https?://[^\s]+$"
NotifyEvent = Literal["failed", "gate_failed", "promoted", "promote_failed", "rolled_back", "serve_unhealthy"]


class Health(_Model):
    """How pipe judges a serving replica: GET `path` answers 2xx within `timeout`, `healthy_after` times in a row."""

    path: Annotated[str, Field(pattern=r"^/")] = "/health"
    interval: Seconds = 2.0
    timeout: Seconds = 1.0
    healthy_after: Annotated[WholeNumber, Field(ge=1, le=100)] = 1
    start_timeout: Seconds = 60.0  # a new replica not healthy by then is stopped; the old one keeps serving


class Serve(_Model):
    """The `serve:` block: which stage's outputs are the model, and the container that answers requests."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["image"], "properties": {"image": {"type": "string"}}},
                  {"required": ["build"], "properties": {"build": {"not": {"type": "null"}}}}],
    })

    model: StageName  # that stage's outputs are mounted read-only at /model
    image: Annotated[str, Field(min_length=1)] | None = None
    build: Annotated[Build | None, BeforeValidator(_build, json_schema_input_type=RelativePath | Build | None)] = None
    command: Command | None = None
    port: Annotated[WholeNumber, Field(ge=1, le=65535)] = 8080  # the container's port
    publish: Annotated[str, Field(pattern=PUBLISH_PATTERN)] = "127.0.0.1:8080"
    health: Health = Health()
    replicas: Annotated[WholeNumber, Field(ge=1, le=16)] = 1
    resources: Resources = Resources()
    env: dict[EnvName, str] = Field({}, json_schema_extra={"additionalProperties": False})
    promote: Literal["auto", "manual"] = "auto"
    restarts: Annotated[WholeNumber, Field(ge=0, le=100)] = 3  # the engine restarts a crashed replica this often

    @field_validator("publish")
    @classmethod
    def _port_in_range(cls, value: str) -> str:
        if not 1 <= int(value.rpartition(":")[2]) <= 65535:
            raise ValueError(f"{value!r}: the port must be 1 to 65535")
        return value

    @model_validator(mode="after")
    def _one_image_source(self) -> Self:
        if self.image is not None and self.build is not None:
            raise keyed_error("image", "set either 'image' or 'build', not both")
        if self.image is None and self.build is None:
            raise keyed_error("", "needs 'image' (an existing image) or 'build' (a folder with a Dockerfile)")
        return self

    @property
    def publish_host(self) -> str:
        return self.publish.rpartition(":")[0].strip("[]")

    @property
    def publish_port(self) -> int:
        return int(self.publish.rpartition(":")[2])

    def argv(self) -> tuple[str, ...] | None:
        return ("/bin/sh", "-c", self.command) if isinstance(self.command, str) else self.command


class Notify(_Model):
    """One `notify:` target: a webhook (POST JSON) or a command (the JSON on its stdin), for the events named."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["webhook"], "properties": {"webhook": {"type": "string"}}},
                  {"required": ["command"], "properties": {"command": {"not": {"type": "null"}}}}],
    })

    webhook: Annotated[str, Field(pattern=URL_PATTERN)] | None = None
    command: Command | None = None
    events: tuple[NotifyEvent, ...] = ("failed", "gate_failed", "promoted", "promote_failed", "serve_unhealthy")
    timeout: Seconds = 5.0
    retries: Annotated[WholeNumber, Field(ge=0, le=10)] = 2

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if self.webhook is not None and self.command is not None:
            raise keyed_error("webhook", "set either 'webhook' or 'command', not both")
        if self.webhook is None and self.command is None:
            raise keyed_error("", "needs 'webhook' (a URL to POST JSON to) or 'command' (JSON on its stdin)")
        return self


SWARM_NEEDS_STORE = ("a swarm moves artifacts between nodes through an object store: add a `remote:` block "
                     "(used by default) or executor.store {url: s3://bucket/prefix/}")


class HandoffStore(_Model):
    """Where a swarm moves artifacts between the invoking host and the nodes: an S3 bucket and prefix.
    `endpoint` is how this host reaches it; `node_endpoint` how the nodes do (default: the same)."""

    url: Annotated[str, Field(pattern=r"^s3://[^/]+(/.*)?$")] | None = None  # None: the `remote:` block's
    endpoint: str | None = None
    node_endpoint: str | None = None


class Executor(_Model):
    """Where stages run: `local` (this host's engine), `swarm` (a Docker Swarm manager at `host`), or `kubernetes`
    (batch/v1 Jobs in `namespace`, kube_executor.py)."""

    model_config = ConfigDict(json_schema_extra={  # _needs, for editors
        "allOf": [
            {"if": {"required": ["kind"], "properties": {"kind": {"const": "swarm"}}},
             "then": {"required": ["registry"]}},
            {"if": {"required": ["kind"], "properties": {"kind": {"const": "kubernetes"}}},
             "then": {"required": ["handoff"]}},
        ],
    })
    kind: Literal["local", "swarm", "kubernetes"] = "local"
    pending_timeout: Seconds = 300.0  # swarm, kubernetes: a task or pod not started by then fails with the reason
    # swarm
    host: str | None = None  # the manager's endpoint; default DOCKER_HOST
    registry: str | None = None  # built images are pushed here and run as registry/repo@sha256:...
    constraints: tuple[str, ...] = ()  # placement constraints for every stage
    store: HandoffStore | None = None  # the hand-off store; default: the pipeline's `remote:` (Pipeline.handoff_store)
    handoff_dir: str = "/var/lib/pipe-handoff"  # a folder that exists on every node (node-local disk)
    # kubernetes
    namespace: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)] = "default"
    context: str | None = None  # a kubeconfig context; None: the current one (KUBECONFIG, ~/.kube/config)
    handoff: Annotated[str, Field(pattern=r"^s3://[^/]+(/.*)?$")] | None = None  # s3://bucket/prefix/ for pods
    endpoint: str | None = None  # an S3-compatible endpoint URL, as pods and pipe both reach it
    agent_image: str = "pipe-busybox:latest"  # the init and upload containers' image (busybox sh, wget, tar)

    @model_validator(mode="after")
    def _needs(self) -> Self:
        if self.kind == "swarm" and self.registry is None:
            raise keyed_error("registry", "a swarm needs 'registry' (where built images are pushed)")
        if self.kind == "kubernetes" and self.handoff is None:
            raise keyed_error("handoff", "kubernetes needs 'handoff' (s3://bucket/prefix/: pods exchange files "
                              "through it)")
        return self


class Remote(_Model):
    """Where cache entries are shared: an S3-compatible bucket and prefix. No credentials: boto3's standard
    chain (environment, shared credentials file, profile) alone supplies them, so the file cannot hold any."""

    url: Annotated[str, Field(pattern=REMOTE_URL_PATTERN)]
    endpoint: Annotated[str, Field(pattern=ENDPOINT_PATTERN)] | None = None  # any S3-compatible server
    push: Literal["auto", "manual"] = "auto"  # auto: a run uploads its stages' entries when it ends


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
    model_config = ConfigDict(json_schema_extra={  # _swarm_store, for editors: a swarm's store, or a remote
        "if": {"required": ["executor"],
               "properties": {"executor": {"required": ["kind"], "properties": {"kind": {"const": "swarm"}}}}},
        "then": {"anyOf": [{"required": ["remote"]},
                           {"properties": {"executor": {"required": ["store"],
                                                        "properties": {"store": {"required": ["url"]}}}}}]},
    })
    name: Annotated[str, Field(pattern=PIPELINE_NAME_PATTERN)] | None = None
    stages: dict[StageName, Stage] = Field(min_length=1, json_schema_extra={"additionalProperties": False})
    defaults: Defaults = Defaults()
    schedule: Schedule | None = None
    secrets_file: str | None = None  # KEY=VALUE lines, outside the repository; the environment wins
    serve: Serve | None = None
    notify: tuple[Notify, ...] = ()
    executor: Executor = Executor()
    remote: Remote | None = None  # the shared cache (README: "The remote")
    _source: Source = PrivateAttr(default_factory=lambda: Source(Path("pipeline.yaml")))

    @model_validator(mode="after")
    def _swarm_store(self) -> Self:
        if self.executor.kind == "swarm" and self.handoff_store is None:
            raise keyed_error("executor.store", SWARM_NEEDS_STORE, at="executor")
        return self

    @property
    def handoff_store(self) -> HandoffStore | None:
        """Where a swarm moves artifacts: `executor.store`, else the `remote:` block (its bucket and prefix; the
        hand-off's objects live under `handoff/`, apart from the cache's)."""
        own = self.executor.store
        if own is not None and own.url is not None:
            return own
        if self.remote is not None:  # `store: {node_endpoint: ...}` alone: the nodes reach the remote elsewhere
            return HandoffStore(url=self.remote.url, endpoint=(own.endpoint if own else None) or self.remote.endpoint,
                                node_endpoint=own.node_endpoint if own else None)
        return None

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
        """The folder of pipeline.yaml, absolute: inputs and build contexts are relative to it."""
        return self._source.path.parent.absolute()

    @property
    def display_name(self) -> str:
        return self.name or re.sub(r"[^A-Za-z0-9_.-]", "-", self.root.resolve().name) or "pipeline"

    def error(self, key: str, problem: str, at: str | None = None) -> SpecError:
        """A SpecError for a check made after parsing, on the line of `at` (default: of `key`)."""
        return SpecError(self.path, self._source.line_of(at or key), key, problem)

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


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of pipeline.yaml that `pipe schema` prints, for editors and CI.

    It gives every document the loader's verdict on its shape: types (strict, as the models are), required and
    unknown keys, names, choices, bounds, image xor build, gate with metrics. Not in it, because they need more
    than the document: the files on disk, this machine's CPUs and memory, the graph (unknown needs, cycles),
    cron expressions and time zones, the grammar of sizes and durations past a pattern, 6 MiB as a minimum of
    a size written as a string, and a path that leaves the folder by an inner `..`.
    """
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **Pipeline.model_json_schema(), "title": "pipe pipeline.yaml"}


def listing(names: Any, limit: int = 12) -> str:
    """ "a, b, c" or "a, b, ... and 4988 more", for messages."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... and {len(names) - limit} more"
