"""Reads pipeline.yaml into a validated Pipeline, and the secrets its stages name. Starts nothing.

The only module where YAML, pydantic and line numbers meet: YAML events become plain data plus a dotted-key ->
line map, pydantic errors are reworded into one-line SpecErrors, and the checks that need the disk run here.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from orchestrator.errors import SpecError, UsageError
from orchestrator.plan import check_acyclic
from orchestrator.spec import (
    ENV_NAME_PATTERN,
    NAME_PATTERN,
    PIPELINE_NAME_PATTERN,
    Pipeline,
    Source,
    describe_value,
)
from orchestrator.units import format_bytes

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64
# Aliases may make the document at most ALIAS_GROWTH times the values written in it (or ALIAS_FLOOR values):
# enough for `<<: *defaults` in every stage, far too little for a "billion laughs" bomb, which is refused from
# the event stream before anything is expanded.
ALIAS_GROWTH = 10
ALIAS_FLOOR = 10_000

# libyaml's parser when PyYAML was built with it: its events cost a tenth of PyYAML's own composer and
# constructor, which is what keeps a 5,000-stage file well under a second.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL, _MERGE = (_TAG + t for t in ("str", "int", "float", "bool", "null", "merge"))
# Plain scalars resolve as in YAML 1.1 (PyYAML's table), except dates, which stay strings: params become JSON.
_IMPLICIT: dict[str, list[tuple[str, re.Pattern[str]]]] = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in (_INT, _FLOAT, _BOOL, _NULL, _MERGE)]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_SCALAR_TAGS = {_STR, _INT, _FLOAT, _BOOL, _NULL}
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_PATTERN_PROBLEMS = {
    NAME_PATTERN: "not a safe name: use lower-case letters, digits, - and _ (a letter first, at most 63)",
    ENV_NAME_PATTERN: "not an environment variable name: use letters, digits and _ (not a digit first)",
    PIPELINE_NAME_PATTERN: "not a safe name: use letters, digits, ., - and _ (at most 63)",
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
    """The validated pipeline of `path`; SpecError naming file, line and key on anything wrong."""
    data, lines = _parse(path, _read_text(path))
    if data is None:
        raise SpecError(path, 1, "(file)", "the file is empty: write a mapping with 'stages'")
    if not isinstance(data, dict):
        raise SpecError(path, 1, "(top level)", f"expected a mapping with 'stages', got {describe_value(data)}")
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as e:
        source = Source(path, lines)
        raise min((_reword(source, err) for err in e.errors(include_url=False)), key=lambda x: x[0])[1] from e
    pipeline = pipeline.with_source(Source(path, lines))
    _check_paths(pipeline)
    _check_machine(pipeline)
    schedule = pipeline.schedule
    if schedule is not None and (problem := _schedule_problem(schedule.cron, schedule.timezone)):
        raise pipeline.error(f"schedule.{problem[0]}", problem[1])
    check_acyclic(pipeline)
    return pipeline


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


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (name the pipeline file, or run pipe in its folder)") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder: name the pipeline file in it") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from e
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(path, 1, "(file)", f"larger than the {format_bytes(MAX_FILE_BYTES)} a pipeline file may be")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        problem = f"not UTF-8: byte 0x{raw[e.start]:02x} at column {column}; save the file as UTF-8"
        raise SpecError(path, line, "(file)", problem) from None
    return text.removeprefix("\ufeff")


class _Frame:
    """A mapping or list being built, with its dotted key and what aliases expand it to."""

    __slots__ = ("anchor", "key", "merge_line", "merges", "merging", "path", "size", "value")

    def __init__(self, value: dict[str, Any] | list[Any], path: str, anchor: str | None) -> None:
        self.value = value
        self.path = path
        self.anchor = anchor
        self.size = 1  # values inside once aliases are expanded, this one included
        self.key: str | None = None  # a mapping's key waiting for its value
        self.merging = False  # a `<<` key waits for its value
        self.merges: list[Any] = []  # values of the `<<` key, merged when the mapping ends
        self.merge_line = 0


class _Builder:
    """Turns YAML events into plain data and a dotted-key -> line map, refusing what a pipeline file may not hold.

    Refused: duplicate keys, keys that are not strings, tags, more than one document, nesting deeper than
    MAX_DEPTH, undefined or recursive aliases, and aliases that expand the document past the ALIAS_GROWTH rule.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self.lines: dict[str, int] = {}
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.stack: list[_Frame] = []
        self.root: Any = None
        self.documents = 0
        self.written = 0  # values written in the file; aliases count once
        self.first_alias: tuple[str, int] | None = None  # where an alias to a mapping or list first appears
        self.root_size = 0  # values in the document once aliases are expanded
        self.resolved: dict[str, str] = {}  # plain scalar -> its tag: keys repeat in every stage

    def build(self, text: str) -> None:
        """Feeds every event of `text` to its handler; the caller turns YAML's own errors into SpecErrors."""
        handlers: dict[type[Event], Callable[[Any], None]] = {
            ScalarEvent: self._scalar,
            MappingStartEvent: self._start,
            SequenceStartEvent: self._start,
            MappingEndEvent: self._end,
            SequenceEndEvent: self._end,
            AliasEvent: self._alias,
            DocumentStartEvent: self._document,
        }
        parser = _LOADER(text)
        try:
            while not isinstance(event := parser.get_event(), StreamEndEvent):
                if handler := handlers.get(type(event)):
                    handler(event)
        finally:
            parser.dispose()

    def finish(self) -> tuple[Any, dict[str, int]]:
        limit = max(ALIAS_GROWTH * self.written, ALIAS_FLOOR)
        if self.first_alias is not None and self.root_size > limit:
            key, line = self.first_alias
            self._fail(key, line, f"aliases expand this file to {self.root_size:,} values, over the limit of "
                       f"{limit:,} ({ALIAS_GROWTH} times the {self.written:,} written): refused as an alias bomb")
        return self.root, self.lines

    def _fail(self, key: str, line: int, problem: str) -> typing.NoReturn:
        raise SpecError(self.file, line, key or "(top level)", problem)

    def _at_key(self) -> bool:
        """Whether the next value is a mapping's key."""
        top = self.stack[-1] if self.stack else None
        return top is not None and top.key is None and not top.merging and type(top.value) is dict

    def _child_path(self) -> str:
        if not self.stack:
            return ""
        top = self.stack[-1]
        if isinstance(top.value, list):
            return f"{top.path}.{len(top.value)}" if top.path else str(len(top.value))
        if top.merging:
            return f"{top.path}.<<" if top.path else "<<"
        if top.key is None:  # the child is a key
            return top.path
        return f"{top.path}.{top.key}" if top.path else top.key

    def _document(self, event: DocumentStartEvent) -> None:
        self.documents += 1
        if self.documents > 1:
            self._fail("(file)", _line(event), "holds more than one YAML document (---): keep one")

    def _scalar(self, event: ScalarEvent) -> None:
        self.written += 1
        tag, text = event.tag, event.value
        if tag is None and not event.style and event.implicit[0]:  # plain: libyaml's style is '', PyYAML's None
            tag = self.resolved.get(text) or self.resolved.setdefault(text, _resolve(text))
        elif tag is None or tag == "!":
            tag = _STR
        elif tag not in _SCALAR_TAGS:
            self._fail(self._child_path(), _line(event), _tag_problem(tag))
        if self._at_key():
            self._key(text, tag, _line(event), event.anchor)
            return
        if tag == _MERGE:
            tag = _STR
        value = self._construct(text, tag, event)
        if event.anchor is not None:
            self.anchors[event.anchor] = (value, 1)
        self._place(value, 1, _line(event))

    def _key(self, text: str, tag: str, line: int, anchor: str | None) -> None:
        top = self.stack[-1]
        assert isinstance(top.value, dict)
        if tag == _MERGE:
            if top.merge_line:
                self._fail(top.path, line, f"duplicate key '<<' (first on line {top.merge_line})")
            top.merging, top.merge_line = True, line
            return
        if tag != _STR:
            kind = {_INT: "a number", _FLOAT: "a number", _BOOL: "true or false", _NULL: "null"}.get(tag, tag)
            problem = f"key {text!r} is read by YAML as {kind}, not a string: quote it"
            self._fail(top.path, line, problem)
        path = f"{top.path}.{text}" if top.path else text
        if text in top.value:
            self._fail(path, line, f"duplicate key (first on line {self.lines.get(path, '?')}): keep one")
        top.key = text
        self.lines[path] = line
        if anchor is not None:
            self.anchors[anchor] = (text, 1)

    def _construct(self, text: str, tag: str, event: ScalarEvent) -> Any:
        if tag == _STR:
            return text
        if tag == _NULL:
            return None
        try:
            if tag == _BOOL:
                return _CONSTRUCTOR.bool_values[text.lower()]
            if tag == _INT:
                return _CONSTRUCTOR.construct_yaml_int(yaml.ScalarNode(tag, text))
            return _CONSTRUCTOR.construct_yaml_float(yaml.ScalarNode(tag, text))
        except (KeyError, ValueError):
            self._fail(self._child_path(), _line(event), f"{text!r} is not a valid {tag.removeprefix(_TAG)}")

    def _start(self, event: MappingStartEvent | SequenceStartEvent) -> None:
        self.written += 1
        line = _line(event)
        is_mapping = isinstance(event, MappingStartEvent)
        if event.tag not in (None, "!", _TAG + ("map" if is_mapping else "seq")):
            self._fail(self._child_path(), line, _tag_problem(event.tag))
        if self._at_key():
            self._fail(self.stack[-1].path, line, "a key must be a plain string, not a mapping or a list")
        if len(self.stack) >= MAX_DEPTH:
            self._fail(self._child_path(), line, f"nested more than {MAX_DEPTH} levels deep")
        path = self._child_path()
        if self.stack and isinstance(self.stack[-1].value, list):
            self.lines[path] = line
        self.stack.append(_Frame({} if is_mapping else [], path, event.anchor))

    def _end(self, event: MappingEndEvent | SequenceEndEvent) -> None:
        frame = self.stack.pop()
        if frame.merges:
            self._merge(frame)
        if frame.anchor is not None:
            self.anchors[frame.anchor] = (frame.value, frame.size)
        self._place(frame.value, frame.size, None)

    def _merge(self, frame: _Frame) -> None:
        """`<<: *base` or `<<: [*a, *b]`: keys written in the mapping win, then earlier merges win (YAML 1.1)."""
        assert isinstance(frame.value, dict)
        merged = frame.merges[0] if isinstance(frame.merges[0], list) else frame.merges
        for source in merged:
            if not isinstance(source, dict):
                self._fail(f"{frame.path}.<<" if frame.path else "<<", frame.merge_line,
                           f"'<<' merges a mapping or a list of mappings, not {describe_value(source)}")
            for key, value in source.items():
                if key not in frame.value:
                    frame.value[key] = value
                    self.lines.setdefault(f"{frame.path}.{key}" if frame.path else key, frame.merge_line)

    def _alias(self, event: AliasEvent) -> None:
        self.written += 1
        anchor = event.anchor or ""
        line = _line(event)
        if anchor not in self.anchors:
            recursive = any(frame.anchor == anchor for frame in self.stack)
            problem = "refers to itself" if recursive else "is not defined above"
            self._fail(self._child_path(), line, f"alias *{anchor} {problem}")
        value, size = self.anchors[anchor]
        if self._at_key():
            if not isinstance(value, str):
                self._fail(self.stack[-1].path, line, "a key must be a plain string, not a mapping or a list")
            self._key(value, _STR, line, None)
            return
        if isinstance(value, (dict, list)) and self.first_alias is None:
            self.first_alias = (self._child_path(), line)
        self._place(value, size, line)

    def _place(self, value: Any, size: int, line: int | None) -> None:
        """Puts a finished value into the mapping or list being built (or makes it the document)."""
        if not self.stack:
            self.root, self.root_size = value, size
            return
        top = self.stack[-1]
        top.size += size
        if isinstance(top.value, list):
            if line is not None:
                self.lines[f"{top.path}.{len(top.value)}" if top.path else str(len(top.value))] = line
            top.value.append(value)
        elif top.merging:
            top.merges.append(value)
            top.merging = False
        else:
            assert top.key is not None
            top.value[top.key] = value
            top.key = None


def _parse(file: Path, text: str) -> tuple[Any, dict[str, int]]:
    builder = _Builder(file)
    try:
        builder.build(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = f"YAML syntax: {e.problem or e.context}"
        if e.context and e.problem and e.context_mark and e.context_mark.line + 1 != line:
            problem += f" ({e.context} on line {e.context_mark.line + 1})"
        if mark is not None and "\t" in (text.splitlines() + [""])[mark.line][: mark.column + 1]:
            problem += " (tabs cannot indent YAML: use spaces)"
        raise SpecError(file, line, "(yaml)", problem) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        character = e.character if isinstance(e.character, int) else ord(e.character)
        raise SpecError(file, line, "(yaml)", f"character #x{character:04x} is not allowed: {e.reason}") from None
    except yaml.YAMLError as e:
        raise SpecError(file, None, "(yaml)", str(e).splitlines()[0]) from None
    return builder.finish()


def _resolve(text: str) -> str:
    for tag, regexp in _IMPLICIT.get(text[:1], ()):
        if regexp.match(text):
            return tag
    return _STR


def _line(event: Event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 0


def _tag_problem(tag: str) -> str:
    shown = "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag
    return f"tag {shown} is not allowed: a pipeline file holds plain strings, numbers, lists and mappings"


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
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
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
