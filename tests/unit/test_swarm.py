"""The swarm executor's pure parts: the `executor:` block, task-state classification, the stage's task template,
the deterministic hand-off tar and the agent's scripts. The real cluster is in tests/contract."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from orchestrator import handoff
from orchestrator.executor import ContainerSpec, Outcome
from orchestrator.swarm_backend import sandbox_warnings
from orchestrator.swarm_executor import caps, classify_task, stage_template
from tests.unit.test_loader import MakePipeline, error_of, text

SWARM = """
    executor:
      kind: swarm
      host: unix:///run/m.sock
      registry: reg:5000
      constraints: ["node.role==worker"]
      store: {url: "s3://b/p/", endpoint: "http://127.0.0.1:1"}
    stages:
      a: {image: x, constraints: ["node.labels.gpu==yes"]}
"""


def test_the_executor_block_and_a_stages_constraints_load(make_pipeline: MakePipeline) -> None:
    from orchestrator.loader import load_pipeline

    pipeline = load_pipeline(make_pipeline(text(SWARM)))
    assert pipeline.executor.kind == "swarm"
    assert pipeline.executor.registry == "reg:5000"
    assert pipeline.executor.constraints == ("node.role==worker",)
    assert pipeline.executor.store is not None and pipeline.executor.store.url == "s3://b/p/"
    assert pipeline.stages["a"].constraints == ("node.labels.gpu==yes",)


def test_the_default_executor_is_local(make_pipeline: MakePipeline) -> None:
    from orchestrator.loader import load_pipeline

    assert load_pipeline(make_pipeline("stages: {a: {image: x}}\n")).executor.kind == "local"


def test_a_swarm_without_a_registry_is_refused_on_its_line(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages: {a: {image: x}}
        executor:
          kind: swarm
          store: {url: "s3://b/p/"}
    """)
    assert message.startswith("2: executor")
    assert "registry" in message


def test_a_swarm_without_a_store_is_refused(make_pipeline: MakePipeline) -> None:
    message = error_of(make_pipeline, """
        stages: {a: {image: x}}
        executor: {kind: swarm, registry: "r:5000"}
    """)
    assert "store" in message and "s3://" in message


def test_an_unknown_executor_kind_is_refused(make_pipeline: MakePipeline) -> None:
    assert "kubernetes" in error_of(make_pipeline, "stages: {a: {image: x}}\nexecutor: {kind: kubernetes}\n")


def _task(state: str, exit_code: int | None = None, err: str | None = None) -> dict[str, object]:
    status: dict[str, object] = {"State": state}
    if exit_code is not None:
        status["ContainerStatus"] = {"ExitCode": exit_code}
    if err:
        status["Err"] = err
    return {"Status": status}


def test_a_rejected_task_with_exit_code_0_is_an_error_with_the_engines_reason() -> None:
    outcome, code, reason = classify_task(_task("rejected", 0, "bind source path does not exist: /x"),
                                          memory_bytes=None, timed_out=False, cancelled=False)
    assert (outcome, code) == (Outcome.ERROR, None)
    assert reason == "swarm task rejected before the stage ran: bind source path does not exist: /x"


def test_a_complete_task_succeeds_and_a_failed_one_keeps_its_exit_code() -> None:
    assert classify_task(_task("complete", 0), memory_bytes=None, timed_out=False, cancelled=False) == (
        Outcome.SUCCEEDED, 0, "")
    assert classify_task(_task("failed", 3), memory_bytes=None, timed_out=False, cancelled=False) == (
        Outcome.FAILED, 3, "exited with code 3")


def test_137_under_a_memory_cap_is_a_probable_oom_and_without_a_cap_a_kill() -> None:
    assert classify_task(_task("failed", 137), memory_bytes=256 << 20, timed_out=False, cancelled=False) == (
        Outcome.OOM, 137, "killed (137), probably out of memory (cap 256 MiB)")
    assert classify_task(_task("failed", 137), memory_bytes=None, timed_out=False, cancelled=False)[0] is (
        Outcome.FAILED)


def test_what_pipe_did_wins_over_the_task_state() -> None:
    assert classify_task(_task("failed", 143), memory_bytes=1 << 30, timed_out=True, cancelled=False,
                         timeout_s=5)[0] is Outcome.TIMEOUT
    assert classify_task(_task("running"), memory_bytes=None, timed_out=False, cancelled=True)[0] is (
        Outcome.CANCELLED)


def test_the_stage_task_has_caps_reservations_sandbox_and_is_pinned_to_its_node() -> None:
    spec = ContainerSpec(name="s", image_id="sha256:1", command=("sh", "-c", "true"), cpus=1.5,
                         memory_bytes=64 << 20, pids=50, user="1000:1000")
    template = stage_template(spec, "reg/pipe/s@sha256:2", "node1", [("/h/r/t/m0", "/outputs", False)], [], "net")
    container = template["ContainerSpec"]
    assert container["Image"] == "reg/pipe/s@sha256:2"
    assert container["Args"] == ["sh", "-c", "true"] and "Command" not in container
    assert (container["ReadOnly"], container["Init"], container["CapabilityDrop"]) == (True, True, ["ALL"])
    assert container["User"] == "1000:1000"
    assert template["Placement"]["Constraints"] == ["node.id==node1"]
    assert template["RestartPolicy"]["Condition"] == "none"
    assert template["Resources"]["Limits"] == {"NanoCPUs": 1_500_000_000, "MemoryBytes": 64 << 20, "Pids": 50}
    assert template["Resources"]["Reservations"] == {"NanoCPUs": 1_500_000_000, "MemoryBytes": 64 << 20}
    assert [n["Target"] for n in template["Networks"]] == ["net"]


def test_an_entrypoint_becomes_the_tasks_command_and_the_command_its_args() -> None:
    spec = ContainerSpec(name="s", image_id="i", command=("--x",), entrypoint=("/bin/tool",))
    container = stage_template(spec, "r@sha256:1", "n", [], [], None)["ContainerSpec"]
    assert (container["Command"], container["Args"]) == (["/bin/tool"], ["--x"])


def test_gpus_are_generic_resources() -> None:
    res = caps(ContainerSpec(name="s", image_id="i", command=None, gpus=2))
    assert res["Reservations"]["GenericResources"] == [{"DiscreteResourceSpec": {"Kind": "gpu", "Value": 2}}]


def test_every_stage_is_warned_of_what_swarm_does_not_enforce(make_pipeline: MakePipeline) -> None:
    from orchestrator.loader import load_pipeline

    lines = sandbox_warnings(load_pipeline(make_pipeline(text(SWARM))), ["a"])
    assert len(lines) == 1 and lines[0].startswith("a: on swarm the stage runs without no-new-privileges")


def _tree(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("f")
    (root / "x.sh").write_text("#!/bin/sh\n")
    (root / "x.sh").chmod(0o755)
    (root / "link").symlink_to("d/f.txt")


def test_the_hand_off_tar_depends_only_on_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a)
    _tree(b)
    os.utime(b / "d" / "f.txt", (1, 1))
    assert handoff.pack(a, tmp_path / "a.tar") == handoff.pack(b, tmp_path / "b.tar")
    (b / "d" / "f.txt").write_text("g")
    assert handoff.pack(a, tmp_path / "a.tar") != handoff.pack(b, tmp_path / "b2.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert sorted(tar.getnames()) == ["d", "d/e", "d/f.txt", "link", "x.sh"]
        assert {m.name: m.mode & 0o777 for m in tar.getmembers()}["x.sh"] == 0o755


@pytest.mark.parametrize("is_dir", [True, False])
def test_the_agents_fetch_script_unpacks_a_tar_under_busybox_sh(tmp_path: Path, is_dir: bool) -> None:
    """The script runs for real (busybox sh, tar, sha256sum); rclone is a shell function copying files (the push
    script and the fetch of blobs run with the real rclone and b3sum in tests/e2e/test_handoff_agent.py)."""
    src = tmp_path / "src"
    if is_dir:
        _tree(src)
    else:
        src.write_text("one file\n")
    store = tmp_path / "store"
    (store / "handoff" / "tars").mkdir(parents=True)
    sha = handoff.pack(src, store / "handoff" / "tars" / "t.tar")
    staged = handoff.Staged("handoff/tars/t.tar", sha, not is_dir)
    root = tmp_path / "h"
    root.mkdir()
    fake = f'rclone() {{ shift 3; a=$1; b=$2; case $a in s3:*) a={store}/${{a#s3:b/}};; esac; ' \
           f'case $b in s3:*) b={store}/${{b#s3:b/}}; mkdir -p $(dirname $b);; esac; cp $a $b; }}\n'
    owner = f"{os.getuid()}:{os.getgid()}"

    def sh(script: str) -> str:
        script = script.replace(handoff.AGENT_ROOT + "/", f"{root}/").replace(
            f"{handoff.AGENT_ROOT} ", f"{root} ")
        done = subprocess.run(["busybox", "sh", "-c", fake + script], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    sh(handoff.fetch_script("run1/t1", [(0, staged)], [1], owner, "b/"))
    got = root / "run1" / "t1" / "m0"
    if is_dir:
        assert (got / "d" / "f.txt").read_text() == "f" and os.readlink(got / "link") == "d/f.txt"
    else:
        assert (got / handoff.FILE_NAME).read_text() == "one file\n"
    assert (root / "run1" / "t1" / "m1").is_dir()  # the writable folder, empty, for the stage


def test_a_corrupt_source_tar_stops_the_fetch(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_text("x")
    store = tmp_path / "store"
    (store / "k").mkdir(parents=True)
    handoff.pack(src, store / "k" / "t.tar")
    staged = handoff.Staged("k/t.tar", "0" * 64, True)
    fake = f'rclone() {{ shift 3; cp {store}/${{1#s3:b/}} $2; }}\n'
    script = handoff.fetch_script("r/t", [(0, staged)], [], "0:0", "b/").replace("/h/", f"{tmp_path}/h/").replace(
        "/h ", f"{tmp_path}/h ")
    (tmp_path / "h").mkdir()
    assert subprocess.run(["busybox", "sh", "-c", fake + script], capture_output=True, check=False).returncode != 0
    assert not (tmp_path / "h" / "r" / "t" / "m0" / handoff.FILE_NAME).exists()


def test_a_log_timestamp_becomes_the_since_the_daemon_reads() -> None:
    from orchestrator.swarm_executor import _unix

    assert _unix(b"2026-12-02T10:00:00.123456789Z") == "1796205600.123456789"
    assert _unix(b"2026-12-02T10:00:00.1Z") == "1796205600.100000000"
    assert _unix(b"2026-12-02T10:00:00+01:00") is None and _unix(b"garbage") is None


class _Response(list[bytes]):
    def close(self) -> None:
        pass


class _Stream:
    """The two log reads the manager answers: `follow` frames, cut by the follower's stop(), then a plain read's
    frames since a time (as the daemon filters them: every frame at or after it)."""

    def __init__(self, followed: list[bytes], everything: list[bytes]) -> None:
        self.followed, self.everything = followed, everything
        self.since: list[str] = []

    def _url(self, path: str, *args: str) -> str:
        return path

    def _get(self, url: str, params: dict[str, object], stream: bool) -> object:
        if params["follow"]:
            return _Response(self.followed)
        self.since.append(str(params["since"]))
        return _Response(self.everything)

    def _multiplexed_response_stream_helper(self, response: _Response) -> object:
        return iter(response)

    def _get_raw_response_socket(self, response: object) -> object:
        raise AttributeError


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4])
def test_the_catch_up_read_passes_on_each_frame_once_in_order(cut: int, tmp_path: Path) -> None:
    from orchestrator.hostfiles import CappedLog, StageLogSink
    from orchestrator.swarm_executor import LogFollower

    t1, t2 = b"2026-12-02T10:00:00.000000001Z", b"2026-12-02T10:00:00.000000002Z"
    frames = [t1 + b" a\n", t2 + b" b\n", t2 + b" b\n", t2 + b" c\n"]  # two frames of one stamp: counted
    stream = _Stream(frames[:cut], [f for f in frames if cut == 0 or f[:30] >= frames[cut - 1][:30]])
    lines: list[str] = []
    with CappedLog(tmp_path / "log") as log:
        follower = LogFollower(stream, "svc", StageLogSink(log, [], lines.append))
        follower._thread.join(5)
        follower.finish(catch_up=True)
    assert lines == ["a", "b", "b", "c"]
    assert stream.since == ["0" if cut == 0 else ("1796205600.000000001" if cut == 1 else "1796205600.000000002")]
    assert not follower._thread.is_alive()


def test_fetch_final_is_the_runs_leaves_and_all_and_none_say_what_they_mean() -> None:
    from orchestrator.api import fetched_stages, parse_fetch
    from orchestrator.errors import UsageError
    from orchestrator.spec import Pipeline

    pipeline = Pipeline.model_validate({"stages": {
        "data": {"image": "x"}, "train": {"image": "x", "needs": ["data"]},
        "evaluate": {"image": "x", "needs": ["data", "train"]}, "predict": {"image": "x", "needs": ["train", "evaluate"]},
        "report": {"image": "x", "needs": ["data"]}}})
    order = ("data", "train", "evaluate", "predict", "report")
    assert fetched_stages("final", pipeline, order) == {"predict", "report"}
    assert fetched_stages("final", pipeline, ("data", "train")) == {"train"}  # leaves of the run, not of the file
    assert fetched_stages("all", pipeline, order) == set(order)
    assert fetched_stages("none", pipeline, order) == set()
    with pytest.raises(UsageError, match="use none, final or all"):
        parse_fetch("some")


def test_a_listing_that_does_not_add_up_is_refused() -> None:
    from orchestrator.errors import RemoteError

    digest = "ab" * 32
    good = f"#sums\n{digest}  ./a\n#stats\n3 644 ./a\n#links\n./l\ta\n#empty\n./e\n".encode()
    tree = handoff.parse_listing(good)
    assert [(f.path, f.size, f.executable, f.link) for f in tree.files] == [("a", 3, False, None), ("l", 0, False, "a")]
    assert tree.empty_dirs == ("e",)
    for bad in (good.replace(b"./a\n#stats", b"./b\n#stats"),  # a digest for a file that has no size
                good.replace(b"3 644", b"x 644"), good.replace(b"./e", b"/e"), good.replace(digest.encode(), b"ab")):
        with pytest.raises(RemoteError):
            handoff.parse_listing(bad)
