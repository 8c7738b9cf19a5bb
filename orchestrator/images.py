"""Resolves every stage's image to an immutable id before any stage runs: builds `build:` contexts, checks `image:`.

Knows nothing of containers, caches or history. A build whose context hash is in the memo (context hash -> image
id, a JSON file) and whose image still exists is not sent to the engine at all.

The context hash covers every file under the context (relative path, mode, content; symlinks by their target
text), the Dockerfile, the build args and the local id of each FROM image. `.dockerignore` is NOT honoured by
the hash: an ignored file that changes only costs a rebuild, which the engine's layer cache makes cheap, whereas
a wrong reading of its patterns could reuse a stale image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import urllib3.exceptions

from orchestrator.errors import EngineError, ImageError
from orchestrator.events import BuildFinished, BuildProgress, BuildStarted
from orchestrator.executor import LABEL_MANAGED
from orchestrator.spec import Build, Pipeline

BuildEvents = Callable[[BuildStarted | BuildProgress | BuildFinished], None]  # a Reporter's emit
CONTEXT_HASH_VERSION = 1  # bump when the recipe below changes: old memo entries then simply miss
MEMO_MAX_ENTRIES = 500
ENGINE_FAULTS = (docker.errors.DockerException, OSError, urllib3.exceptions.HTTPError)
_STEP = re.compile(r"^Step (\d+)/(\d+) :")
_RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")  # the classic builder's intermediate container
_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE)


def resolve_images(
    pipeline: Pipeline,
    stages: Iterable[str],
    client: docker.DockerClient,
    memo_path: Path,
    on_event: BuildEvents,
    log_dir: Path | None = None,
) -> dict[str, str]:
    """stage -> image id (sha256:...) for `stages`, in their order. Raises ImageError for a missing image or a
    failed build, EngineError when the engine cannot be reached. Identical contexts are built once.

    Each build emits BuildStarted, BuildProgress per output line and BuildFinished, also when it fails or is
    interrupted. Its output goes to a file in `log_dir` (default: builds/ beside the memo), kept only when the
    build fails; the ImageError names it. An exception raised while a build runs (KeyboardInterrupt from the
    CLI's signal handler) stops the build: its connection is closed and its intermediate container removed."""
    log_dir = log_dir or memo_path.parent / "builds"
    memo = _read_memo(memo_path)
    by_ref: dict[str, str] = {}
    by_context: dict[str, str] = {}
    resolved: dict[str, str] = {}
    try:
        for name in stages:
            stage = pipeline.stages[name]
            if stage.image is not None:
                if stage.image not in by_ref:
                    by_ref[stage.image] = _existing_image(pipeline, name, stage.image, client)
                resolved[name] = by_ref[stage.image]
                continue
            assert stage.build is not None  # spec.py: exactly one of image/build
            digest = context_hash(pipeline.root, stage.build, _base_ids(pipeline, name, stage.build, client))
            if digest not in by_context:
                image_id = memo.get(digest)
                if image_id is None or not _exists(client, image_id):
                    image_id = _build(pipeline, name, stage.build, client, on_event, log_dir)
                    memo[digest] = image_id
                    _write_memo(memo_path, memo)
                by_context[digest] = image_id
            resolved[name] = by_context[digest]
    except docker.errors.APIError as e:
        raise ImageError(
            f"docker engine refused an image request: {_one_line(e.explanation or str(e))}"
        ) from e
    except ENGINE_FAULTS as e:
        raise EngineError(
            f"docker engine unreachable: {_one_line(str(e))}; start it with scripts/engine.sh"
        ) from e
    return resolved


def context_hash(root: Path, build: Build, base_ids: dict[str, str]) -> str:
    """The hash of everything that decides what a build produces, as far as pipe can see it without the engine."""
    context = root / build.context
    h = hashlib.blake2b(digest_size=32)

    def add(*parts: object) -> None:
        h.update(json.dumps(parts, separators=(",", ":")).encode() + b"\n")

    add("v", CONTEXT_HASH_VERSION, build.dockerfile, sorted(build.args.items()), sorted(base_ids.items()))
    add("dockerfile", _file_digest(context / build.dockerfile))
    for path in sorted(_walk(context), key=lambda p: p.relative_to(context).as_posix()):
        rel = path.relative_to(context).as_posix()
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            add("l", rel, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            add("d", rel, mode)
        elif stat.S_ISREG(st.st_mode):
            add("f", rel, mode, _file_digest(path))
    return h.hexdigest()


def _walk(context: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(context):  # does not follow symlinked folders
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    pipeline: Pipeline, name: str, build: Build, client: docker.DockerClient, on_event: BuildEvents, log_dir: Path
) -> str:
    """Build with the engine, streaming its output into a log file and progress events; the image id, or
    ImageError with the failing step's message and where its full log is."""
    context = pipeline.root / build.context
    where = _where(pipeline, name, "build")
    if not context.is_dir():
        raise ImageError(f"{where}: build context {context} is not a folder")
    tag = f"pipe/{_slug(pipeline.display_name)}-{_slug(name)}:latest"  # a name for people; pipe uses the id
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


def _read_memo(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: every build is simply a miss
    if not isinstance(data, dict) or data.get("version") != CONTEXT_HASH_VERSION:
        return {}
    entries = data.get("images")
    return {str(k): str(v) for k, v in entries.items()} if isinstance(entries, dict) else {}


def _write_memo(path: Path, memo: dict[str, str]) -> None:
    """Atomically: a temporary file in the same folder, then os.replace. Keeps the newest MEMO_MAX_ENTRIES."""
    kept = dict(list(memo.items())[-MEMO_MAX_ENTRIES:])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".images-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CONTEXT_HASH_VERSION, "images": kept}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _where(pipeline: Pipeline, name: str, key: str) -> str:
    dotted = f"stages.{name}.{key}"
    return f"{pipeline.path}:{pipeline.source.line_of(dotted) or '?'}: {dotted}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "stage"


def _one_line(text: Any) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."
