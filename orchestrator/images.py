"""Resolves every stage's image to an immutable id before any stage runs: builds `build:` contexts, checks `image:`.

Knows nothing of containers, caches or history. What to build is imageplan.forecast's decision (the context hash
and the memo are documented there): a build whose context hash is in the memo and whose image still exists is
not sent to the engine at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import urllib3.exceptions

from orchestrator.errors import EngineError, ImageError
from orchestrator.executor import LABEL_MANAGED
from orchestrator.hashing import HashMemo
from orchestrator.imageplan import ImageForecast, ImageMemo, forecast
from orchestrator.spec import Build, Pipeline

BuildOutput = Callable[[str, str], None]  # (stage, line)
T = TypeVar("T")
ENGINE_FAULTS = (docker.errors.DockerException, OSError, urllib3.exceptions.HTTPError)
_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE)


class DockerView:
    """imageplan.EngineView answered by the engine, with read-only calls."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client

    def base_ids(self, pipeline: Pipeline, name: str, build: Build) -> dict[str, str]:
        return _base_ids(pipeline, name, build, self._client)

    def local_id(self, ref: str) -> str | None:
        try:
            return str(self._client.images.get(ref).id)
        except docker.errors.ImageNotFound:
            return None

    def exists(self, image_id: str) -> bool:
        return _exists(self._client, image_id)


def engine_faults(action: Callable[[], T]) -> T:
    """Run `action`, turning the engine's refusals into ImageError and its absence into EngineError."""
    try:
        return action()
    except docker.errors.APIError as e:
        raise ImageError(
            f"docker engine refused an image request: {_one_line(e.explanation or str(e))}"
        ) from e
    except ENGINE_FAULTS as e:
        raise EngineError(f"docker engine unreachable: {_one_line(str(e))}") from e


def forecast_images(pipeline: Pipeline, stages: Iterable[str], client: docker.DockerClient, memo_path: Path,
                    hash_memo: HashMemo | None = None) -> dict[str, ImageForecast]:
    """`pipe run --dry-run`: imageplan.forecast with the engine's view; builds, pulls and writes nothing."""
    memo = ImageMemo.load(memo_path)
    return engine_faults(lambda: forecast(pipeline, stages, memo, DockerView(client), hash_memo))


def resolve_images(
    pipeline: Pipeline,
    stages: Iterable[str],
    client: docker.DockerClient,
    memo_path: Path,
    on_output: BuildOutput,
    hash_memo: HashMemo | None = None,
) -> dict[str, str]:
    """stage -> image id (sha256:...) for `stages`, in their order: the forecast, then what it says must be built
    or pulled. Raises ImageError for a missing image or a failed build, EngineError when the engine cannot be
    reached. Identical contexts are built once."""
    memo = ImageMemo.load(memo_path)
    view = DockerView(client)
    names = tuple(stages)

    def resolve() -> dict[str, str]:
        planned = forecast(pipeline, names, memo, view, hash_memo)
        resolved: dict[str, str] = {}
        for name in names:
            stage, plan = pipeline.stages[name], planned[name]
            image_id = plan.image_id or (memo.images.get(plan.context) if plan.context else None)  # a twin's build
            if not image_id:
                if stage.image is not None:
                    image_id = _existing_image(pipeline, name, stage.image, client)
                else:
                    assert stage.build is not None  # spec.py: exactly one of image/build
                    image_id = _build(pipeline, name, stage.build, client, on_output)
            base_ids = view.base_ids(pipeline, name, stage.build) if stage.build is not None else None
            memo.remember(pipeline.display_name, name, plan, image_id, base_ids, stage.image)
            resolved[name] = image_id
        memo.save()
        return resolved

    return engine_faults(resolve)


def _base_ids(pipeline: Pipeline, name: str, build: Build, client: docker.DockerClient) -> dict[str, str]:
    """FROM image -> its local id ("" when absent or not resolvable), so a rebuilt base image invalidates."""
    dockerfile = pipeline.root / build.context / build.dockerfile
    try:
        text = dockerfile.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ImageError(
            f"{_where(pipeline, name, 'build')}: cannot read {dockerfile}: {e.strerror}; check build.context and "
            "build.dockerfile"
        ) from e
    ids: dict[str, str] = {}
    stage_names: set[str] = set()
    for match in _FROM.finditer(text):
        ref, alias = match.group(1), match.group(2)
        if ref.lower() != "scratch" and ref not in stage_names and "$" not in ref:
            try:
                ids[ref] = str(client.images.get(ref).id)
            except docker.errors.ImageNotFound:
                ids[ref] = ""  # the build pulls it or fails with the engine's message
        if alias:
            stage_names.add(alias)
    return ids


def _existing_image(pipeline: Pipeline, name: str, ref: str, client: docker.DockerClient) -> str:
    try:
        return str(client.images.get(ref).id)
    except docker.errors.ImageNotFound:
        pass
    try:
        return str(client.images.pull(ref).id)  # the tag in `ref`, or latest
    except docker.errors.APIError as e:
        raise ImageError(
            f"{_where(pipeline, name, 'image')}: image {ref!r} not found locally and cannot be pulled: "
            f"{_one_line(e.explanation or str(e))}"
        ) from e


def _exists(client: docker.DockerClient, image_id: str) -> bool:
    try:
        client.images.get(image_id)
    except docker.errors.ImageNotFound:
        return False
    return True


def _build(
    pipeline: Pipeline, name: str, build: Build, client: docker.DockerClient, on_output: BuildOutput
) -> str:
    """Build with the engine, streaming its output; the image id, or ImageError with the failing step's message."""
    context = pipeline.root / build.context
    where = _where(pipeline, name, "build")
    if not context.is_dir():
        raise ImageError(f"{where}: build context {context} is not a folder")
    tag = f"pipe/{_slug(pipeline.display_name)}-{_slug(name)}:latest"  # a name for people; pipe uses the id
    image_id = ""
    last_line = ""
    try:
        chunks = client.api.build(
            path=str(context),
            dockerfile=build.dockerfile,
            buildargs=dict(build.args),
            tag=tag,
            labels={LABEL_MANAGED: "1"},
            rm=True,
            forcerm=True,
            decode=True,
        )
        for chunk in chunks:
            if "error" in chunk:
                detail = _one_line(str(chunk["error"]))
                cause = f" (last output: {last_line})" if last_line and last_line not in detail else ""
                raise ImageError(f"{where}: build of {build.context} failed: {detail}{cause}")
            for line in str(chunk.get("stream", "")).splitlines():
                if line.strip():
                    on_output(name, line.rstrip())
                    if not line.startswith(("Step ", " ---> ", "Removing intermediate")):
                        last_line = _one_line(line)
            image_id = (chunk.get("aux") or {}).get("ID", image_id)
    except docker.errors.APIError as e:
        raise ImageError(
            f"{where}: build of {build.context} failed: {_one_line(e.explanation or str(e))}"
        ) from e
    return image_id or str(client.images.get(tag).id)


def _where(pipeline: Pipeline, name: str, key: str) -> str:
    dotted = f"stages.{name}.{key}"
    return f"{pipeline.path}:{pipeline.source.line_of(dotted) or '?'}: {dotted}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "stage"


def _one_line(text: Any) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."


def remove_unused_built_images(client: docker.DockerClient, memo_path: Path, keep: set[str],
                               refs: Iterable[str], dry_run: bool) -> tuple[list[str], list[str], int]:
    """gc of the images pipe built (the memo's ids): removes each that no id in `keep`, no `image:` ref in `refs`
    and no container uses, never forcing, and forgets it in the memo. Returns (removed ids, ids kept because a
    container or another tag holds them, bytes freed: each image's size less what it shares with others)."""
    memo = ImageMemo.load(memo_path)

    def remove() -> tuple[list[str], list[str], int]:
        keep_ids = set(keep)
        for ref in refs:
            try:
                keep_ids.add(str(client.images.get(ref).id))
            except docker.errors.ImageNotFound:
                continue
        candidates = sorted({image_id for image_id in memo.images.values() if image_id not in keep_ids})
        if not candidates:
            return [], [], 0
        used = {str(c.attrs.get("Image")) for c in client.containers.list(all=True, ignore_removed=True)}
        sizes = {str(i.get("Id")): int(i.get("Size") or 0) - max(int(i.get("SharedSize") or 0), 0)
                 for i in client.df().get("Images") or []}
        removed, held, freed = [], [], 0
        for image_id in candidates:
            if image_id in used:
                held.append(image_id)
                continue
            if image_id in sizes and not dry_run:
                try:
                    client.images.remove(image_id, force=False)
                except docker.errors.APIError as e:
                    if e.status_code != 409:  # 409: a container, or another tag, holds it
                        raise
                    held.append(image_id)
                    continue
            removed.append(image_id)
            freed += sizes.get(image_id, 0)
        if not dry_run:
            memo.forget(removed)
            memo.save()
        return removed, held, freed

    return engine_faults(remove)
