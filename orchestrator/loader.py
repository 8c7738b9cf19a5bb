"""Reads pipeline.yaml into a validated Pipeline, and the secrets its stages name. Starts nothing.

yamlfile reads the file into plain data and a dotted-key -> line map; here pydantic validates it, its errors
are reworded into one-line SpecErrors on the line of their key, and the checks that need the disk run.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from orchestrator.errors import SpecError
from orchestrator.hostfiles import host_memory_bytes
from orchestrator.plan import check_acyclic
from orchestrator.spec import (
    ENDPOINT_PATTERN,
    ENV_NAME_PATTERN,
    NAME_PATTERN,
    PIPELINE_NAME_PATTERN,
    REMOTE_URL_PATTERN,
    Pipeline,
    Source,
    describe_value,
    listing,
)
from orchestrator.units import format_bytes
from orchestrator.yamlfile import read_yaml

_PATTERN_PROBLEMS = {
    NAME_PATTERN: "not a safe name: use lower-case letters, digits, - and _ (a letter first, at most 63)",
    ENV_NAME_PATTERN: "not an environment variable name: use letters, digits and _ (not a digit first)",
    PIPELINE_NAME_PATTERN: "not a safe name: use letters, digits, ., - and _ (at most 63)",
    REMOTE_URL_PATTERN: "not an S3 URL: write s3://bucket/prefix/ (credentials come from the AWS environment)",
    ENDPOINT_PATTERN: "not an http(s) URL without credentials, such as http://127.0.0.1:9000",
}
_EXPECTED = {  # pydantic's type errors -> what the value should have been
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}
_BOUNDS = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
           "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}


def load_pipeline(path: Path) -> Pipeline:
    """The validated pipeline of `path`; SpecError naming file, line and key on anything wrong (the first in
    the file when the document has several)."""
    pipeline, errors = check_pipeline(path)
    if errors:
        raise errors[0]
    assert pipeline is not None
    return pipeline


def check_pipeline(path: Path) -> tuple[Pipeline | None, list[SpecError]]:
    """The pipeline, or every error in the document's shape in file order (`pipe validate --json`): one
    SpecError a key, from pydantic; the checks after it (disk, machine, schedule, graph) stop at the first."""
    data, lines = read_yaml(path)
    if data is None:
        raise SpecError(path, 1, "(file)", "the file is empty: write a mapping with 'stages'")
    if not isinstance(data, dict):
        raise SpecError(path, 1, "(top level)", f"expected a mapping with 'stages', got {describe_value(data)}")
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as e:
        source = Source(path, lines)
        errors: dict[str, tuple[tuple[bool, int], SpecError]] = {}
        for order, error in (_reword(source, err) for err in e.errors(include_url=False)):
            errors.setdefault(error.key, (order, error))
        return None, [error for _, error in sorted(errors.values(), key=lambda x: x[0])]
    try:
        return _check_loaded(pipeline.with_source(Source(path, lines))), []
    except SpecError as e:
        return None, [e]


def _check_loaded(pipeline: Pipeline) -> Pipeline:
    _check_needs(pipeline)
    _check_paths(pipeline)
    _check_machine(pipeline)
    _check_serve(pipeline)
    schedule = pipeline.schedule
    if schedule is not None and (problem := _schedule_problem(schedule.cron, schedule.timezone)):
        raise pipeline.error(f"schedule.{problem[0]}", problem[1])
    check_acyclic(pipeline)
    return pipeline


def _check_needs(pipeline: Pipeline) -> None:
    for name, stage in pipeline.stages.items():
        for i, up in enumerate(stage.needs):
            if up not in pipeline.stages:
                close = difflib.get_close_matches(up, pipeline.stages, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"stages: {listing(pipeline.stages)}"
                key = f"stages.{name}.needs"
                raise pipeline.error(key, f"unknown stage {up!r} ({hint})", at=f"{key}.{i}")


def resolve_secrets(pipeline: Pipeline, environ: Mapping[str, str]) -> dict[str, str]:
    """{NAME: value} for every secret a stage names: from `environ`, else from the pipeline's secrets_file.

    A missing secret is a SpecError naming the secret and the stage; no value ever appears in a message.
    """
    from_file: dict[str, str] | None = None
    resolved: dict[str, str] = {}
    for name, stage in pipeline.stages.items():
        for i, secret in enumerate(stage.secrets):
            if secret in resolved:
                continue
            if secret in environ:
                resolved[secret] = environ[secret]
                continue
            if from_file is None:
                from_file = _read_secrets_file(pipeline)
            if secret not in from_file:
                where = f" or add it to {_secrets_path(pipeline)}" if pipeline.secrets_file else ""
                key = f"stages.{name}.secrets"
                raise pipeline.error(key, f"secret {secret} is not set: export it{where}", at=f"{key}.{i}")
            resolved[secret] = from_file[secret]
    return resolved


def _reword(source: Source, err: ErrorDetails) -> tuple[tuple[bool, int], SpecError]:
    """One pydantic error as a SpecError on the line of the key it is about, and where it sorts in the file
    (a key missing at the top has no line: it sorts last, and the message says line 1)."""
    loc = tuple(str(part) for part in err["loc"] if part != "[key]")
    ctx = err.get("ctx") or {}
    key = at = ".".join(loc)
    if err["type"] == "pipe_spec":  # spec.keyed_error: a key relative to the model that raised it
        key = ".".join(p for p in (key, ctx["key"]) if p)
        at = ".".join(p for p in (at, ctx["at"]) if p)
    line = source.line_of(at)
    return (line is None, line or 0), SpecError(source.path, line or 1, key or "(top level)", _problem(err, loc))


def _problem(err: ErrorDetails, loc: tuple[str, ...]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err["input"]
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})")
    if kind == "missing":
        return "required key is missing"
    if kind == "pipe_spec":
        return str(ctx["problem"])
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if kind == "string_pattern_mismatch":
        return _PATTERN_PROBLEMS.get(ctx["pattern"], f"does not match the pattern {ctx['pattern']}")
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        if kind in ("tuple_type", "list_type") and _item_type(loc) is str:
            expected = "a list of strings"
        quote = " (quote it to make it a string)" if kind == "string_type" and isinstance(value, (int, float)) else ""
        return f"expected {expected}, got {describe_value(value)}{quote}"
    if kind == "literal_error":
        return f"expected {ctx['expected']}, got {describe_value(value)}"
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        bound = ctx[name]
        shown = f"{bound:g}" if isinstance(bound, (int, float)) else str(bound)
        return f"must be {words} {shown}, got {describe_value(value)}"
    if kind == "finite_number":
        return f"expected a finite number, got {describe_value(value)}"
    if kind == "too_short":
        return "needs at least one stage" if loc == ("stages",) else "must not be empty"
    message = err["msg"]
    return message[:1].lower() + message[1:]


def _annotation_at(loc: tuple[str, ...]) -> Any:
    """The declared type at `loc` in the Pipeline model (None when `loc` leaves the models)."""
    current: Any = Pipeline
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (dict, tuple, list):
            current = typing.get_args(current)[-1 if typing.get_origin(current) is dict else 0]
        else:
            return None
    return _unwrap(current)


def _unwrap(annotation: Any) -> Any:
    """Strips Annotated[...] and `| None`."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    model = _annotation_at(loc)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _item_type(loc: tuple[str, ...]) -> Any:
    container = _annotation_at(loc)
    args = typing.get_args(container) if typing.get_origin(container) in (tuple, list) else ()
    return _unwrap(args[0]) if args else None


def _check_paths(pipeline: Pipeline) -> None:
    """Inputs, build contexts and Dockerfiles exist and stay inside the pipeline's folder, symlinks included."""
    root = Path(os.path.realpath(pipeline.root))
    for name, stage in pipeline.stages.items():
        for i, rel in enumerate(stage.inputs):
            key = f"stages.{name}.inputs"
            _check_inside(pipeline, root, rel, key, f"{key}.{i}")
        if stage.build is not None:
            key = f"stages.{name}.build"
            context = _check_inside(pipeline, root, stage.build.context, f"{key}.context")
            if not context.is_dir():
                raise pipeline.error(f"{key}.context", f"{stage.build.context!r} is not a folder")
            dockerfile = posixpath.join(stage.build.context, stage.build.dockerfile)
            if not _check_inside(pipeline, root, dockerfile, f"{key}.dockerfile").is_file():
                raise pipeline.error(f"{key}.dockerfile", f"{dockerfile!r} is not a file")
    if pipeline.secrets_file is not None and not _secrets_path(pipeline).is_file():
        raise pipeline.error("secrets_file", f"{_secrets_path(pipeline)} does not exist")


def _check_inside(pipeline: Pipeline, root: Path, rel: str, key: str, at: str | None = None) -> Path:
    """The real path of root/rel, which must exist inside `root`; a folder must hold no symlink out of it."""
    if posixpath.isabs(rel):
        raise pipeline.error(key, f"{rel!r} is absolute: use a path relative to the pipeline's folder", at)
    normal = posixpath.normpath(rel)
    if normal == ".." or normal.startswith("../"):
        raise pipeline.error(key, f"{rel!r} leaves the pipeline's folder", at)
    target = root / normal
    if not os.path.lexists(target):
        raise pipeline.error(key, f"{rel!r} does not exist in {root}", at)
    real = Path(os.path.realpath(target))
    if not real.is_relative_to(root):
        raise pipeline.error(key, f"{rel!r} is a symlink to {real}, outside the pipeline's folder", at)
    if not real.exists():
        raise pipeline.error(key, f"{rel!r} is a broken symlink", at)
    folders = [real] if real.is_dir() else []
    while folders:  # symlinks are not followed, only checked
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        if not Path(os.path.realpath(entry.path)).is_relative_to(root):
                            inner = Path(entry.path).relative_to(root)
                            problem = f"{rel!r} holds {str(inner)!r}, a symlink out of the pipeline's folder"
                            raise pipeline.error(key, problem, at)
                    elif entry.is_dir():
                        folders.append(Path(entry.path))
        except OSError as e:
            raise pipeline.error(key, f"cannot read {folder}: {e.strerror}", at) from e
    return real


def _check_machine(pipeline: Pipeline) -> None:
    """No cap this file sets may exceed the whole machine: such a stage could never be scheduled."""
    cpus = os.cpu_count() or 1
    memory = host_memory_bytes()
    caps = [("defaults.resources", pipeline.defaults.resources)]
    caps += [(f"stages.{name}.resources", stage.resources) for name, stage in pipeline.stages.items()]
    for prefix, resources in caps:
        written = prefix != "defaults.resources" or f"{prefix}.cpus" in pipeline.source.lines
        if written and resources.cpus is not None and resources.cpus > cpus:
            raise pipeline.error(f"{prefix}.cpus", f"{resources.cpus:g} CPUs exceed this machine's {cpus}")
        written = prefix != "defaults.resources" or f"{prefix}.memory" in pipeline.source.lines
        if written and resources.memory is not None and resources.memory > memory:
            problem = f"{format_bytes(resources.memory)} exceeds this machine's {format_bytes(memory)}"
            raise pipeline.error(f"{prefix}.memory", problem)


def _secrets_path(pipeline: Pipeline) -> Path:
    assert pipeline.secrets_file is not None
    return pipeline.root / Path(pipeline.secrets_file).expanduser()


def _read_secrets_file(pipeline: Pipeline) -> dict[str, str]:
    """KEY=VALUE lines (`export ` and surrounding quotes allowed, # comments); a bad line is named, not shown."""
    if pipeline.secrets_file is None:
        return {}
    path = _secrets_path(pipeline)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise pipeline.error("secrets_file", f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not name.strip():
            raise SpecError(path, number, "secrets_file", "expected NAME=VALUE (the line is not shown: it may be secret)")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def _schedule_problem(expression: str, timezone: str) -> tuple[str, str] | None:
    from orchestrator import cron  # croniter is slow to import and most pipelines have no schedule

    return cron.schedule_problem(expression, timezone)


def _check_serve(pipeline: Pipeline) -> None:
    """`serve.model` names a stage, and a `serve.build` context is a folder with its Dockerfile inside the folder."""
    serve = pipeline.serve
    if serve is None:
        return
    if serve.model not in pipeline.stages:
        close = difflib.get_close_matches(serve.model, pipeline.stages, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"stages: {listing(pipeline.stages)}"
        raise pipeline.error("serve.model", f"unknown stage {serve.model!r} ({hint})")
    if serve.build is not None:
        root = Path(os.path.realpath(pipeline.root))
        context = _check_inside(pipeline, root, serve.build.context, "serve.build.context")
        if not context.is_dir():
            raise pipeline.error("serve.build.context", f"{serve.build.context!r} is not a folder")
        dockerfile = posixpath.join(serve.build.context, serve.build.dockerfile)
        if not _check_inside(pipeline, root, dockerfile, "serve.build.dockerfile").is_file():
            raise pipeline.error("serve.build.dockerfile", f"{dockerfile!r} is not a file")
