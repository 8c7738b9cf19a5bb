"""Resolves every stage's image to an immutable id before any stage runs: builds `build:` contexts, checks `image:`.

Knows nothing of containers, caches or history. What to build is imageplan.forecast's decision (the context hash
and the memo are documented there): a build whose context hash is in the memo and whose image still exists is
not sent to the engine at all.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors

from orchestrator.docker_executor import ENGINE_FAULTS, unreachable
from orchestrator.errors import ImageError
from orchestrator.events import BuildEvents, BuildFinished, BuildProgress, BuildStarted, Notice
from orchestrator.executor import LABEL_MANAGED
from orchestrator.hashing import HashMemo
from orchestrator.imageplan import ImageForecast, ImageIndex, ImageMemo, base_ids, context_hash, forecast
from orchestrator.imageplan import where as _where
from orchestrator.spec import Build, Pipeline

T = TypeVar("T")
EDITED_DURING_BUILD = "its context changed during the build: the image is used by this run only, not remembered"
_STEP = re.compile(r"^Step (\d+)/(\d+) :")
_RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")  # the classic builder's intermediate container


class DockerView:
    """imageplan.EngineView answered by the engine, with read-only calls: one image list for every reference
    and id (ImageIndex), then one inspect per reference the list does not name (a digest, an id prefix)."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client
        self._index: ImageIndex | None = None
        self._ids: dict[str, str | None] = {}
        self._exists: dict[str, bool] = {}

    def _listed(self) -> ImageIndex:
        if self._index is None:
            self._index = ImageIndex(self._client.api.images())
        return self._index

    def base_ids(self, pipeline: Pipeline, name: str, build: Build) -> dict[str, str]:
        return base_ids(pipeline, name, build, self.local_id)

    def local_id(self, ref: str) -> str | None:
        if ref not in self._ids:
            found = self._listed().local_id(ref)
            if found is None:
                try:
                    found = str(self._client.images.get(ref).id)
                except docker.errors.ImageNotFound:
                    found = None
            self._ids[ref] = found
        return self._ids[ref]

    def exists(self, image_id: str) -> bool:
        if image_id not in self._exists:
            self._exists[image_id] = self._listed().has(image_id) or _exists(self._client, image_id)
        return self._exists[image_id]


def engine_faults(action: Callable[[], T]) -> T:
    """Run `action`, turning the engine's refusals into ImageError and its absence into EngineError."""
    try:
        return action()
    except docker.errors.APIError as e:
        raise ImageError(
            f"docker engine refused an image request: {_one_line(e.explanation or str(e))}"
        ) from e
    except ENGINE_FAULTS as e:
        raise unreachable(e) from e


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
    on_event: BuildEvents,
    hash_memo: HashMemo | None = None,
    log_dir: Path | None = None,
    seed_cache: bool = False,
) -> dict[str, str]:
    """stage -> image id (sha256:...) for `stages`, in their order: the forecast, then what it says must be built
    or pulled. Raises ImageError for a missing image or a failed build, EngineError when the engine cannot be
    reached. Identical contexts are built once.

    Each build emits BuildStarted, BuildProgress per output line and BuildFinished, also when it fails or is
    interrupted. Its output goes to a file in `log_dir` (default: builds/ beside the memo), kept only when the
    build fails; the ImageError names it. An exception raised while a build runs (KeyboardInterrupt from the
    CLI's signal handler) stops the build: its connection is closed and its intermediate container removed. A
    context edited while it was being built is not remembered (the next run builds it again).

    With `seed_cache` (a swarm manager's builds), the pipeline's own stage images already on the engine are the
    build's cache sources (`docker build --cache-from`), so a manager that never built them reuses images loaded
    onto it (`docker save | docker load` from a machine that built them): the same steps give the same image id,
    where the engine's own cache knows only the images it built itself."""
    log_dir = log_dir or memo_path.parent / "builds"
    memo = ImageMemo.load(memo_path)
    view = DockerView(client)
    names = tuple(stages)

    def resolve() -> dict[str, str]:
        planned = forecast(pipeline, names, memo, view, hash_memo)
        resolved: dict[str, str] = {}
        built: dict[str | None, str] = {}  # context hash -> image built by this call, for a twin stage
        for name in names:
            stage, plan = pipeline.stages[name], planned[name]
            image_id = plan.image_id or (built.get(plan.context) if plan.context else None)
            if not image_id:
                if stage.image is not None:
                    image_id = _existing_image(pipeline, name, stage.image, client)
                else:
                    assert stage.build is not None  # spec.py: exactly one of image/build
                    sources = _cache_sources(pipeline, name, view) if seed_cache else []
                    image_id = built[plan.context] = _build(pipeline, name, stage.build, client, on_event, log_dir,
                                                            sources)
            base_ids = view.base_ids(pipeline, name, stage.build) if stage.build is not None else None
            if stage.build is not None and plan.image_id is None \
                    and context_hash(pipeline.root, stage.build, base_ids or {}, hash_memo)[0] != plan.context:
                on_event(Notice(f"{name}: {EDITED_DURING_BUILD}"))
                resolved[name] = image_id  # this run uses what was built; nothing remembers it
                continue
            memo.remember(pipeline.display_name, name, plan, image_id, base_ids, stage.image)
            resolved[name] = image_id
        memo.save()
        return resolved

    return engine_faults(resolve)


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


def build_tag(pipeline: Pipeline, name: str) -> str:
    """The tag a stage's built image gets: a name for people (and cache sources); pipe itself uses the id."""
    return f"pipe/{_slug(pipeline.display_name)}-{_slug(name)}:latest"


def _cache_sources(pipeline: Pipeline, name: str, view: DockerView) -> list[str]:
    """The build stages' tags the engine has, the stage's own first. The engine follows the first source that
    matches a step and no other after it, so its own image must come first; the others are there because the
    engine takes a cached step only from an ancestor of a source, and the stages share their heavy first
    layers (a stage never built yet reuses them)."""
    tags = [build_tag(pipeline, name)]
    tags += [build_tag(pipeline, n) for n, s in pipeline.stages.items() if s.build is not None]
    return [tag for tag in dict.fromkeys(tags) if view.local_id(tag) is not None]


def _build(
    pipeline: Pipeline, name: str, build: Build, client: docker.DockerClient, on_event: BuildEvents, log_dir: Path,
    cache_from: list[str] | None = None,
) -> str:
    """Build with the engine, streaming its output into a log file and progress events; the image id, or
    ImageError with the failing step's message and where its full log is."""
    context = pipeline.root / build.context
    where = _where(pipeline, name, "build")
    if not context.is_dir():
        raise ImageError(f"{where}: build context {context} is not a folder")
    tag = build_tag(pipeline, name)
    log_path = _new_log_path(log_dir, name)
    started = time.monotonic()
    on_event(BuildStarted(name, build.context))
    image_id, last_line, step, total, running_in = "", "", 0, 0, ""
    failure = ""
    with open(log_path, "w", encoding="utf-8") as log, _build_response(client) as responses:
        try:
            chunks = client.api.build(
                path=str(context),
                dockerfile=build.dockerfile,
                buildargs=dict(build.args),
                tag=tag,
                cache_from=cache_from or None,
                labels={LABEL_MANAGED: "1"},
                rm=True,
                forcerm=True,
                decode=True,
            )
            for chunk in chunks:
                if "error" in chunk:
                    detail = _one_line(str(chunk["error"]))
                    log.write(str(chunk["error"]).rstrip() + "\n")
                    cause = f" (last output: {last_line})" if last_line and last_line not in detail else ""
                    failure = f"build of {build.context} failed: {detail}{cause}"
                    break
                for line in str(chunk.get("stream", "")).splitlines():
                    if not line.strip():
                        continue
                    log.write(line.rstrip() + "\n")
                    if match := _STEP.match(line):
                        step, total = int(match.group(1)), int(match.group(2))
                    elif match := _RUNNING_IN.match(line):
                        running_in = match.group(1)
                    elif not line.startswith((" ---> ", "Removing intermediate")):
                        last_line = _one_line(line)
                    on_event(BuildProgress(name, step, total, line.rstrip()))
                image_id = (chunk.get("aux") or {}).get("ID", image_id)
        except docker.errors.APIError as e:
            failure = f"build of {build.context} failed: {_one_line(e.explanation or str(e))}"
        except BaseException as e:  # interrupted (Ctrl-C) or the engine lost: stop the build, leave nothing behind
            for response in responses:
                with suppress(Exception):
                    response.close()  # the engine cancels a build whose client went away
            if running_in and not isinstance(e, ENGINE_FAULTS):
                _remove_build_container(client, running_in)
            log.close()
            log_path.unlink(missing_ok=True)
            reason = "engine lost" if isinstance(e, ENGINE_FAULTS) else "interrupted"
            on_event(BuildFinished(name, False, time.monotonic() - started, None, reason))
            raise
    took = time.monotonic() - started
    if failure:
        on_event(BuildFinished(name, False, took, str(log_path), failure))
        raise ImageError(f"{where}: {failure}; full log: {log_path}")
    log_path.unlink(missing_ok=True)  # kept only to explain a failure
    try:
        image_id = image_id or str(client.images.get(tag).id)
    finally:
        on_event(BuildFinished(name, True, took))
    return image_id


def _new_log_path(log_dir: Path, name: str) -> Path:
    """builds/<stage>-<UTC time>.log, unique (a suffix when two builds of one stage start in the same second)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path, n = log_dir / f"{name}-{stamp}.log", 1
    while path.exists():
        n += 1
        path = log_dir / f"{name}-{stamp}-{n}.log"
    return path


@contextmanager
def _build_response(client: docker.DockerClient) -> Iterator[list[Any]]:
    """The HTTP responses of build requests made inside the block (a requests session hook): docker-py's build
    generator does not expose its response, and only closing it tells the engine to stop the build."""
    responses: list[Any] = []

    def keep(response: Any, *args: Any, **kwargs: Any) -> Any:
        if response.request.path_url.split("?")[0].endswith("/build"):
            responses.append(response)
        return response

    hooks = client.api.hooks.setdefault("response", [])
    hooks.append(keep)
    try:
        yield responses
    finally:
        hooks.remove(keep)
        for response in responses:
            with suppress(Exception):
                response.close()


def _remove_build_container(client: docker.DockerClient, container_id: str, timeout_s: float = 10) -> None:
    """Kill and remove the build's intermediate container; the engine may be removing it too (a 409 then), so
    wait, bounded, until it is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client.api.remove_container(container_id, force=True)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            time.sleep(0.1)  # 409: removal in progress by the engine's own cancellation
        except ENGINE_FAULTS:
            return  # the engine is lost: the next run's sweep cannot see it either, but nothing more can be done



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
