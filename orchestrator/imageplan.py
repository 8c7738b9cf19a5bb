"""What each stage's image would be, decided without building or pulling anything.

`pipe run` (images.resolve_images), `pipe run --dry-run` and `pipe status` all call `forecast`, so they cannot
disagree about which image a stage runs or why it would be rebuilt. What only the engine knows (the local id of a
FROM image, whether an image still exists) comes through an `EngineView`: images.DockerView asks the engine
(read-only calls), `RecordedView` answers from what the last resolution recorded (status needs no engine; it
assumes the base images did not change since).

The context hash (CONTEXT_HASH_VERSION 2) is the canonical hash of the Dockerfile's path and digest, the build
args, the local id of each FROM image and the context folder's tree digest (hashing.hash_tree: every file's
relative path, content, executable bit and symlink target; empty folders). `.dockerignore` is NOT honoured: an
ignored file that changes only costs a rebuild, which the engine's layer cache makes cheap, whereas a wrong
reading of its patterns could reuse a stale image. The memo (runs/images.json) maps context hash -> image id and
keeps, per stage, the context's file digests (to name what changed) and the base ids it was built on.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import ImageError
from orchestrator.hashing import HashMemo, TreeDigest, canonical_hash, hash_file, hash_tree
from orchestrator.spec import Build, Pipeline

CONTEXT_HASH_VERSION = 2  # bump when the recipe changes: old memo entries then simply miss
MEMO_MAX_ENTRIES = 500
SHOW_CHANGED = 3  # changed files named in a reason; the rest are counted
_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE)


class EngineView(Protocol):
    """The engine's side of a forecast; read-only."""

    def base_ids(self, pipeline: Pipeline, name: str, build: Build) -> dict[str, str]:
        """FROM image -> its local id ("" when absent)."""
        ...

    def local_id(self, ref: str) -> str | None:
        """The local id of an image reference, or None if the engine does not have it (never pulls)."""
        ...

    def exists(self, image_id: str) -> bool: ...


@dataclass(frozen=True)
class ImageForecast:
    image_id: str | None  # None: it must be built (or pulled) first
    reason: str = ""  # why it would be built or pulled, for people
    context: str | None = None  # the context hash of a build stage
    tree: TreeDigest | None = None  # the context's files, recorded once the image is built


@dataclass
class ImageMemo:
    """runs/images.json: context hash -> image id, and per stage what its last resolution saw."""

    path: Path
    images: dict[str, str] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ImageMemo:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls(path)  # absent or damaged: every build is simply a miss
        if not isinstance(data, dict) or data.get("version") != CONTEXT_HASH_VERSION:
            return cls(path)
        images, stages = data.get("images"), data.get("stages")
        return cls(path, {str(k): str(v) for k, v in images.items()} if isinstance(images, dict) else {},
                   dict(stages) if isinstance(stages, dict) else {})

    def remember(self, pipeline: str, name: str, forecast: ImageForecast, image_id: str,
                 base_ids: dict[str, str] | None = None, ref: str | None = None) -> None:
        if forecast.context is not None:
            self.images[forecast.context] = image_id
        files = {f.path: f.digest for f in forecast.tree.files} if forecast.tree else {}
        self.stages[f"{pipeline}/{name}"] = {"image_id": image_id, "context": forecast.context,
                                             "base_ids": base_ids or {}, "files": files, "ref": ref}

    def forget(self, image_ids: Iterable[str]) -> None:
        """Drop removed images: their contexts then simply miss (and rebuild)."""
        gone = set(image_ids)
        self.images = {k: v for k, v in self.images.items() if v not in gone}
        self.stages = {k: v for k, v in self.stages.items() if v.get("image_id") not in gone}

    def last(self, pipeline: str, name: str) -> dict[str, Any]:
        entry = self.stages.get(f"{pipeline}/{name}")
        return entry if isinstance(entry, dict) else {}

    def save(self) -> None:
        """Atomically: a temporary file in the same folder, then os.replace. Keeps the newest entries."""
        kept = dict(list(self.images.items())[-MEMO_MAX_ENTRIES:])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".images-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": CONTEXT_HASH_VERSION, "images": kept, "stages": self.stages}, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


class RecordedView:
    """An EngineView from the memo alone: what the last resolution of each stage saw."""

    def __init__(self, memo: ImageMemo) -> None:
        self._memo = memo

    def base_ids(self, pipeline: Pipeline, name: str, build: Build) -> dict[str, str]:
        return dict(self._memo.last(pipeline.display_name, name).get("base_ids") or {})

    def local_id(self, ref: str) -> str | None:
        for entry in self._memo.stages.values():
            if entry.get("ref") == ref:
                return str(entry["image_id"])
        return None

    def exists(self, image_id: str) -> bool:
        return True


class ImageIndex:
    """The engine's image list (`GET /images/json`, one call) as the answers an EngineView gives: a reference
    named in it (a tag, `name` meaning `name:latest`, or a repo digest) -> its id; an id in it exists. A miss is
    not an answer: the caller asks the engine about that one reference (an id prefix, a registry spelling)."""

    def __init__(self, listing: Iterable[dict[str, Any]]) -> None:
        self._refs: dict[str, str] = {}
        self._ids: set[str] = set()
        for image in listing:
            image_id = str(image.get("Id") or "")
            if not image_id:
                continue
            self._ids.add(image_id)
            for ref in (image.get("RepoTags") or []) + (image.get("RepoDigests") or []):
                if ref and not ref.startswith("<none>"):
                    self._refs[str(ref)] = image_id

    def local_id(self, ref: str) -> str | None:
        if ref in self._refs:
            return self._refs[ref]
        if ref in self._ids:
            return ref
        name = ref.rsplit("/", 1)[-1]
        if "@" not in ref and ":" not in name:  # no tag: the engine reads `name` as `name:latest`
            return self._refs.get(f"{ref}:latest")
        return None

    def has(self, image_id: str) -> bool:
        return image_id in self._ids


def where(pipeline: Pipeline, name: str, key: str) -> str:
    """"path:line: stages.NAME.KEY", for a message about one stage's image."""
    dotted = f"stages.{name}.{key}"
    return f"{pipeline.path}:{pipeline.source.line_of(dotted) or '?'}: {dotted}"


def base_ids(pipeline: Pipeline, name: str, build: Build, local_id: Callable[[str], str | None]
             ) -> dict[str, str]:
    """FROM image -> its local id ("" when absent or not resolvable), so a rebuilt base image invalidates."""
    dockerfile = pipeline.root / build.context / build.dockerfile
    try:
        text = dockerfile.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ImageError(
            f"{where(pipeline, name, 'build')}: cannot read {dockerfile}: {e.strerror}; check build.context and "
            "build.dockerfile"
        ) from e
    ids: dict[str, str] = {}
    stage_names: set[str] = set()
    for match in _FROM.finditer(text):
        ref, alias = match.group(1), match.group(2)
        if ref.lower() != "scratch" and ref not in stage_names and "$" not in ref:
            ids[ref] = local_id(ref) or ""  # absent: the build pulls it or fails with the engine's message
        if alias:
            stage_names.add(alias)
    return ids


def context_hash(root: Path, build: Build, base_ids: dict[str, str], memo: HashMemo | None = None
                 ) -> tuple[str, TreeDigest]:
    """The hash of everything that decides what a build produces, as far as pipe can see it without building."""
    context = root / build.context
    tree = hash_tree(context, memo)
    digest = canonical_hash({"v": CONTEXT_HASH_VERSION, "dockerfile": build.dockerfile,
                             "dockerfile_digest": hash_file(context / build.dockerfile),
                             "args": dict(build.args), "base_ids": base_ids, "tree": tree.digest})
    return digest, tree


def forecast(pipeline: Pipeline, stages: Iterable[str], memo: ImageMemo, view: EngineView,
             hash_memo: HashMemo | None = None) -> dict[str, ImageForecast]:
    """stage -> what image it runs, or why one must be built or pulled first. Builds and pulls nothing."""
    found: dict[str, ImageForecast] = {}
    for name in stages:
        stage = pipeline.stages[name]
        if stage.image is not None:
            image_id = view.local_id(stage.image)
            found[name] = ImageForecast(image_id, "" if image_id else f"image {stage.image} would be pulled")
            continue
        assert stage.build is not None  # spec.py: exactly one of image/build
        if not (pipeline.root / stage.build.context).is_dir():
            found[name] = ImageForecast(None, f"build context {stage.build.context} is not a folder")
            continue
        digest, tree = context_hash(pipeline.root, stage.build, view.base_ids(pipeline, name, stage.build),
                                    hash_memo)
        image_id = memo.images.get(digest)
        if image_id is not None and view.exists(image_id):
            found[name] = ImageForecast(image_id, "", digest, tree)
        else:
            reason = _rebuild_reason(memo.last(pipeline.display_name, name), tree, stage.build.context)
            found[name] = ImageForecast(None, reason, digest, tree)
    return found


def _rebuild_reason(last: dict[str, Any], tree: TreeDigest, context: str) -> str:
    before = last.get("files")
    if not isinstance(before, dict) or not before:
        return "image would be built"
    now = {f.path: f.digest for f in tree.files}
    changed = sorted(f"{context.rstrip('/')}/{p}" for p in before.keys() | now.keys() if before.get(p) != now.get(p))
    if not changed:
        return "image would be rebuilt (base image or build args changed)"
    shown = ", ".join(changed[:SHOW_CHANGED]) + (f" and {len(changed) - SHOW_CHANGED} more"
                                                if len(changed) > SHOW_CHANGED else "")
    return f"image would be rebuilt (context changed: {shown})"


def resolve_known(pipeline: Pipeline, stages: Iterable[str], memo_path: Path, view: EngineView,
                  hash_memo: HashMemo | None = None) -> dict[str, str] | None:
    """stage -> image id when the engine already has every stage's image (a no-op rerun), each remembered as
    images.resolve_images remembers one; None when any must be built or pulled (then that call does it all)."""
    memo = ImageMemo.load(memo_path)
    names = tuple(stages)
    planned = forecast(pipeline, names, memo, view, hash_memo)
    ids = {name: plan.image_id for name, plan in planned.items() if plan.image_id is not None}
    if len(ids) < len(names):
        return None
    for name in names:
        stage = pipeline.stages[name]
        base = view.base_ids(pipeline, name, stage.build) if stage.build is not None else None
        memo.remember(pipeline.display_name, name, planned[name], ids[name], base, stage.image)
    memo.save()
    return ids
