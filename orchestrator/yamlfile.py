"""Reads a pipeline file into plain data and a dotted-key -> line map, refusing what a pipeline file may not hold.

It reads libyaml's parse events (not yaml.compose, which took over 1 s on 5,000 stages) and builds the data and
the line map at once. Refused, as a SpecError naming file, line and key: files over MAX_FILE_BYTES, bytes that
are not UTF-8, YAML syntax errors, duplicate keys, keys that are not strings, tags (`!!python/object`), more
than one document, nesting deeper than MAX_DEPTH, undefined or recursive aliases, and alias bombs.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
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
from orchestrator.spec import describe_value
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


def read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The document of `path` as plain data (None when empty), and the line of every dotted key in it."""
    text = _read_text(path)
    builder = _Builder(path)
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
        raise SpecError(path, line, "(yaml)", problem) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        character = e.character if isinstance(e.character, int) else ord(e.character)
        raise SpecError(path, line, "(yaml)", f"character #x{character:04x} is not allowed: {e.reason}") from None
    except yaml.YAMLError as e:
        raise SpecError(path, None, "(yaml)", str(e).splitlines()[0]) from None
    return builder.finish()


def read_value(text: str) -> Any:
    """A value given on the command line (`-p train.lr=1e-3`), read by the same rules as a value in the file, so
    one spelling means one value: `10.0` a float, `10` an int, `yes` true, `[1, 2]` a list, `2024-01-31` a
    string, empty null. ValueError naming the problem (YAML syntax, a tag, an alias, more than one document)."""
    builder = _Builder(Path("(value)"))
    try:
        builder.build(text)
        value, _ = builder.finish()
    except SpecError as e:
        raise ValueError(e.problem) from None
    except yaml.MarkedYAMLError as e:
        raise ValueError(f"YAML syntax: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    return value


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
