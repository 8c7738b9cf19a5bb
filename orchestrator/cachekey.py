"""A stage's cache key: what enters it, and why it differs from the last successful run's.

The recipe (KEY_VERSION 2):

    key = canonical_hash(asdict(Ingredients)): blake3 hex of the JSON object, keys sorted, separators "," ":",
    UTF-8, with the fields
      version     KEY_VERSION (2)
      image       the image id the stage runs (sha256:...); a retag to the same content keeps it
      command     the argv, or null for the image's CMD (a string command is ["/bin/sh", "-c", text])
      entrypoint  the argv, or null for the image's ENTRYPOINT
      workdir     the working directory in the container
      env         {NAME: value} of the stage's env; secrets never enter it, so rotating a token re-runs nothing
      params      the stage's params after command-line overrides, nested as written, in their canonical
                  JSON: the value the stage reads in /pipe/params.json, so its types count. An int and a
                  float are different values even when equal as numbers (`10` and `10.0`, `100` and `1e2`
                  read as a float), as are true and 1: a stage may well behave differently (range(10.0)
                  raises), so reusing the other's outputs would be wrong. A miss says so by type:
                  `param noise 10.0 (float) -> 10 (int)`. NaN and infinities are refused before a key is
                  made (loader, overrides): JSON cannot hold them.
      inputs      {declared path: digest}: a file's blake3; a folder's canonical_hash of
                  {"files": [[relative path, blake3 or symlink digest, executable, link target or null], ...],
                   "empty_dirs": [...]} sorted by path (hashing.hash_tree); the mtime never enters
      upstream    {stage in needs: digest of its outputs folder, the same tree recipe}, not its key, so an
                  upstream re-run with byte-identical outputs keeps this stage cached (early cut-off)
    Resources, timeouts, retries and secrets do not enter the key. Changing anything above bumps KEY_VERSION.

The key and the explanation of a miss are derived from one canonical form, `canonical_json` (the text
canonical_hash hashes): two values are the same ingredient exactly when their canonical JSON is the same, never
by Python's `==` (for which 10 == 10.0 and True == 1). History from an older recipe is explained as
"cache recipe changed (v1 -> v2)", not field by field.

Versions: 1, params compared by Python equality in explanations, and `-p` values read as JSON; 2, one canonical
form for key and explanation, `-p` values read as YAML scalars like the file's (overrides.py), NaN refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from orchestrator.hashing import canonical_hash, canonical_json

KEY_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class Ingredients:
    """Everything that enters a stage's cache key; stored with each run to explain the next miss."""

    version: int = KEY_VERSION
    image: str
    command: tuple[str, ...] | list[str] | None  # stored as a tuple either way
    entrypoint: tuple[str, ...] | list[str] | None
    workdir: str
    env: dict[str, str]
    params: dict[str, Any]
    inputs: dict[str, str]
    upstream: dict[str, str]

    def __post_init__(self) -> None:  # JSON gives lists back; compare and hash argvs as tuples
        for name in ("command", "entrypoint"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    def key(self) -> str:
        return canonical_hash(asdict(self))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Ingredients:
        """Reads what to_json wrote, also from an older recipe (missing fields are empty); ValueError if garbage."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: object) -> Ingredients:
        if not isinstance(data, dict) or not isinstance(data.get("image"), str):
            raise ValueError("not a cache ingredients record")  # noqa: TRY004 - bad stored data, not a bad call
        empty: dict[str, object] = {
            "version": 0,
            "command": None,
            "entrypoint": None,
            "workdir": "",
            "env": {},
            "params": {},
            "inputs": {},
            "upstream": {},
        }
        return cls(**{f.name: data.get(f.name, empty.get(f.name)) for f in fields(cls)})


def explain_miss(previous: Ingredients | None, current: Ingredients) -> list[str]:
    """One short reason per ingredient that differs from `previous` (the last successful run); [] if none."""
    if previous is None:
        return ["never ran"]
    if previous.version != current.version:  # the other fields may not even mean the same thing
        return [f"cache recipe changed (v{previous.version} -> v{current.version})"]
    reasons = []
    if previous.image != current.image:
        reasons.append(f"image rebuilt ({_short_id(previous.image)} -> {_short_id(current.image)})")
    for name in ("command", "entrypoint", "workdir"):
        if getattr(previous, name) != getattr(current, name):
            reasons.append(f"{name} changed")
    reasons += _diff("env", previous.env, current.env, lambda k, a, b: f"env {k} changed")
    reasons += _diff(
        "param",
        _flatten(previous.params),
        _flatten(current.params),
        lambda k, a, b: f"param {k} {_show(a, b)} -> {_show(b, a)}",
    )
    reasons += _diff(
        "input",
        previous.inputs,
        current.inputs,
        lambda k, a, b: f"input {k} changed ({a[:8]}.. -> {b[:8]}..)",
    )
    reasons += _diff(
        "upstream", previous.upstream, current.upstream, lambda k, a, b: f"upstream {k} outputs changed"
    )
    return reasons


def _diff(
    kind: str, old: dict[str, Any], new: dict[str, Any], changed: Callable[[str, Any, Any], str]
) -> list[str]:
    reasons = []
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            reasons.append(f"{kind} {name} added")
        elif name not in new:
            reasons.append(f"{kind} {name} removed")
        elif canonical_json(old[name]) != canonical_json(new[name]):
            reasons.append(changed(name, old[name], new[name]))
    return reasons


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _show(value: object, other: object) -> str:
    """The value as JSON, with its type when the other side is a scalar of another type (10.0 (float) -> 10 (int))."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = text if len(text) <= 40 else text[:37] + "..."
    if _kind(value) != _kind(other) and _kind(value) in _SCALARS and _kind(other) in _SCALARS:
        text += f" ({_kind(value)})"
    return text


_SCALARS = frozenset({"int", "float", "bool", "string", "null"})


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "list" if isinstance(value, (list, tuple)) else "mapping"


def _short_id(image_id: str) -> str:
    algorithm, _, digest = image_id.rpartition(":")
    return f"{algorithm}:{digest[:12]}" if algorithm else digest[:12]
