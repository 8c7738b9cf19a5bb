"""images.resolve_images against the real engine: builds, the memo that skips the engine, missing and broken images."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import imageplan, images
from orchestrator.errors import ImageError
from orchestrator.events import BuildFinished, BuildProgress, BuildStarted
from orchestrator.executor import LABEL_MANAGED
from orchestrator.spec import Pipeline, Source
from tests.conftest import BUSYBOX


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "stages" / "hello").mkdir(parents=True)
    (root / "stages" / "hello" / "Dockerfile").write_text(f"FROM {BUSYBOX}\nCOPY hello.txt /hello.txt\n")
    (root / "stages" / "hello" / "hello.txt").write_text("hello\n")
    return root


@pytest.fixture
def pipeline_of(project: Path, docker: Any) -> Iterator[Callable[[dict[str, Any]], Pipeline]]:
    """A Pipeline from a dict of stages; every image it built is removed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield lambda stages: Pipeline.model_validate({"name": name, "stages": stages}).with_source(
        Source(project / "pipeline.yaml", {"stages.train.image": 7, "stages.bad.build": 9})
    )
    for image in docker.images.list(filters={"label": LABEL_MANAGED}):
        if any(tag.startswith(f"pipe/{name}-") for tag in image.tags):
            docker.images.remove(image.id, force=True)


@pytest.fixture
def build_calls(docker: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the builds sent to the engine (the real build still runs)."""
    calls: list[str] = []
    real_build = docker.api.build

    def counting_build(**kwargs: Any) -> Any:
        calls.append(kwargs["path"])
        return real_build(**kwargs)

    monkeypatch.setattr(docker.api, "build", counting_build)
    return calls


def resolve(pipeline: Pipeline, docker: Any, memo: Path, output: list[Any] | None = None) -> dict[str, str]:
    sink = output if output is not None else []
    return images.resolve_images(pipeline, list(pipeline.stages), docker, memo, sink.append)


def test_build_gives_an_immutable_labelled_image(
    pipeline_of: Any, docker: Any, tmp_path: Path, build_calls: list[str]
) -> None:
    output: list[Any] = []
    resolved = resolve(
        pipeline_of({"hello": {"build": "stages/hello"}}), docker, tmp_path / "images.json", output
    )
    image_id = resolved["hello"]
    assert image_id.startswith("sha256:")
    image = docker.images.get(image_id)
    assert image.labels[LABEL_MANAGED] == "1"
    memo = json.loads((tmp_path / "images.json").read_text())
    assert list(memo["images"].values()) == [image_id]
    assert len(build_calls) == 1


def test_a_build_reports_its_start_steps_and_end(
    pipeline_of: Any, docker: Any, tmp_path: Path
) -> None:
    output: list[Any] = []
    resolve(pipeline_of({"hello": {"build": "stages/hello"}}), docker, tmp_path / "images.json", output)
    assert output[0] == BuildStarted("hello", "stages/hello")
    steps = [(e.step, e.total) for e in output[1:-1] if isinstance(e, BuildProgress)]
    assert len(steps) == len(output) - 2 and (1, 3) in steps and steps[-1] == (3, 3)  # the engine adds LABEL
    assert any("COPY hello.txt" in e.line for e in output[1:-1])
    end = output[-1]
    assert isinstance(end, BuildFinished) and (end.stage, end.ok, end.log_path) == ("hello", True, None)
    assert not list((tmp_path / "builds").iterdir()), "a build that succeeded keeps no log"


def test_memo_hit_does_not_call_the_engine_build(
    pipeline_of: Any, docker: Any, tmp_path: Path, build_calls: list[str]
) -> None:
    pipeline = pipeline_of({"hello": {"build": "stages/hello"}})
    first = resolve(pipeline, docker, tmp_path / "images.json")
    second = resolve(pipeline, docker, tmp_path / "images.json")
    assert second == first
    assert len(build_calls) == 1


def test_stages_sharing_a_context_are_built_once(
    pipeline_of: Any, docker: Any, tmp_path: Path, build_calls: list[str]
) -> None:
    pipeline = pipeline_of({"a": {"build": "stages/hello"}, "b": {"build": {"context": "stages/hello"}}})
    resolved = resolve(pipeline, docker, tmp_path / "images.json")
    assert resolved["a"] == resolved["b"]
    assert len(build_calls) == 1


def test_changed_file_mode_or_build_arg_rebuilds(
    pipeline_of: Any, docker: Any, tmp_path: Path, project: Path, build_calls: list[str]
) -> None:
    memo = tmp_path / "images.json"
    resolve(pipeline_of({"hello": {"build": "stages/hello"}}), docker, memo)
    (project / "stages" / "hello" / "hello.txt").write_text("changed\n")
    changed = resolve(pipeline_of({"hello": {"build": "stages/hello"}}), docker, memo)
    assert len(build_calls) == 2
    (project / "stages" / "hello" / "hello.txt").chmod(0o755)
    resolve(pipeline_of({"hello": {"build": "stages/hello"}}), docker, memo)
    assert len(build_calls) == 3
    with_arg = resolve(
        pipeline_of({"hello": {"build": {"context": "stages/hello", "args": {"X": "1"}}}}), docker, memo
    )
    assert len(build_calls) == 4
    assert with_arg["hello"] != changed["hello"]


def test_memo_entry_whose_image_is_gone_rebuilds(
    pipeline_of: Any, docker: Any, tmp_path: Path, build_calls: list[str]
) -> None:
    pipeline = pipeline_of({"hello": {"build": "stages/hello"}})
    first = resolve(pipeline, docker, tmp_path / "images.json")["hello"]
    docker.images.remove(first, force=True)
    second = resolve(pipeline, docker, tmp_path / "images.json")["hello"]
    assert len(build_calls) == 2
    assert docker.images.get(second)


def test_damaged_memo_is_a_miss(
    pipeline_of: Any, docker: Any, tmp_path: Path, build_calls: list[str]
) -> None:
    memo = tmp_path / "images.json"
    memo.write_text("{not json")
    resolve(pipeline_of({"hello": {"build": "stages/hello"}}), docker, memo)
    assert len(build_calls) == 1
    assert json.loads(memo.read_text())["version"] == imageplan.CONTEXT_HASH_VERSION


def test_existing_image_resolves_to_its_id(pipeline_of: Any, docker: Any, tmp_path: Path) -> None:
    resolved = resolve(pipeline_of({"train": {"image": BUSYBOX}}), docker, tmp_path / "images.json")
    assert resolved == {"train": docker.images.get(BUSYBOX).id}


def test_missing_image_is_an_image_error(pipeline_of: Any, docker: Any, tmp_path: Path) -> None:
    pipeline = pipeline_of({"train": {"image": "pipe-no-such-image:1.2"}})
    with pytest.raises(ImageError) as info:
        resolve(pipeline, docker, tmp_path / "images.json")
    message = str(info.value)
    assert message.startswith(
        f"{pipeline.path}:7: stages.train.image: image 'pipe-no-such-image:1.2' not found locally and cannot be "
        "pulled: "
    )
    assert "\n" not in message


def test_failed_build_is_an_image_error_with_the_steps_message(
    pipeline_of: Any, docker: Any, tmp_path: Path, project: Path
) -> None:
    (project / "stages" / "bad").mkdir()
    (project / "stages" / "bad" / "Dockerfile").write_text(
        f"FROM {BUSYBOX}\nRUN echo 'about to fail' && echo 'missing thing' >&2 && exit 3\n"
    )
    output: list[Any] = []
    with pytest.raises(ImageError) as info:
        resolve(pipeline_of({"bad": {"build": "stages/bad"}}), docker, tmp_path / "images.json", output)
    message = str(info.value)
    assert message.startswith(
        f"{project / 'pipeline.yaml'}:9: stages.bad.build: build of stages/bad failed: "
    )
    assert "returned a non-zero code: 3" in message
    assert "missing thing" in message
    assert "\n" not in message
    assert not (tmp_path / "images.json").exists()  # nothing memoised for a failed build
    (log,) = (tmp_path / "builds").iterdir()  # kept, beside the memo, for later
    assert log.name.startswith("bad-") and message.endswith(f"; full log: {log}")
    text = log.read_text()
    assert "Step 2/3 : RUN echo 'about to fail'" in text and "missing thing" in text
    assert "returned a non-zero code: 3" in text
    end = output[-1]
    assert isinstance(end, BuildFinished) and (end.ok, end.log_path) == (False, str(log))


def test_missing_dockerfile_is_an_image_error(
    pipeline_of: Any, docker: Any, tmp_path: Path, project: Path
) -> None:
    (project / "stages" / "empty").mkdir()
    with pytest.raises(ImageError, match=r"stages\.empty\.build: cannot read .*Dockerfile"):
        resolve(pipeline_of({"empty": {"build": "stages/empty"}}), docker, tmp_path / "images.json")
