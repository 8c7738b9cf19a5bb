"""A stage's cache key: what enters it, and why it differs from the last successful run's.

The recipe (KEY_VERSION 1):

    key = canonical_hash(asdict(Ingredients)): blake3 hex of the JSON object, keys sorted, separators "," ":",
    UTF-8, with the fields
      version     KEY_VERSION (1)
      image       the image id the stage runs (sha256:...); a retag to the same content keeps it
      command     the argv, or null for the image's CMD (a string command is ["/bin/sh", "-c", text])
      entrypoint  the argv, or null for the image's ENTRYPOINT
      workdir     the working directory in the container
      env         {NAME: value} of the stage's env; secrets never enter it, so rotating a token re-runs nothing
      params      the stage's params after command-line overrides, nested as written
      inputs      {declared path: digest}: a file's blake3; a folder's canonical_hash of
                  {"files": [[relative path, blake3 or symlink digest, executable, link target or null], ...],
                   "empty_dirs": [...]} sorted by path (hashing.hash_tree); the mtime never enters
      upstream    {stage in needs: digest of its outputs folder, the same tree recipe}, not its key, so an
                  upstream re-run with byte-identical outputs keeps this stage cached (early cut-off)
    Resources, timeouts, retries and secrets do not enter the key. Changing anything above bumps KEY_VERSION.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from orchestrator.hashing import canonical_hash

KEY_VERSION = 1


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
        lambda k, a, b: f"param {k} {_show(a)} -> {_show(b)}",
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
        elif old[name] != new[name]:
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


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _short_id(image_id: str) -> str:
    algorithm, _, digest = image_id.rpartition(":")
    return f"{algorithm}:{digest[:12]}" if algorithm else digest[:12]
