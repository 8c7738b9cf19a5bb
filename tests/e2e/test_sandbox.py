"""Issue 6 through `pipe run`: escapes leave the host unchanged, outputs are the user's, secrets never leak.

tests/integration/test_sandbox.py inspects the executor's containers; here the whole product runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.executor import LABEL_PIPELINE, LABEL_STAGE
from tests.conftest import BUSYBOX, wait_for
from tests.e2e.helpers import containers_created, pipe, pipe_json

Snapshot = dict[str, tuple[str, bytes | str, int]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under root except its runs/ folder: kind, content (a symlink's target text), mode."""
    tree: Snapshot = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d != "runs"]
        for name in [*dirs, *files]:
            path = Path(folder, name)
            mode = path.lstat().st_mode
            if path.is_symlink():
                tree[str(path.relative_to(root))] = ("link", os.readlink(path), mode)
            elif path.is_dir():
                tree[str(path.relative_to(root))] = ("dir", b"", mode)
            else:
                tree[str(path.relative_to(root))] = ("file", path.read_bytes(), mode)
    return tree


def every_file(root: Path) -> Iterator[Path]:
    """Every regular file under root, symlinks not followed."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in every_file(root) if needle in p.read_bytes()]


def run_ok(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = pipe("run", path, *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def stage_lines(output: str, stage: str) -> list[str]:
    """What a stage printed, from `pipe run`'s plain output lines "HH:MM:SS stage | text"."""
    marker = f" {stage} | "
    return [line.split(marker, 1)[1] for line in output.splitlines() if marker in line]


def stages_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["stage"]: s for s in report["stages"]}


def unique(label: str) -> str:
    return f"{label}-{secrets.token_hex(12)}"


# ---------------------------------------------------------------------------------------------------- escapes


def test_writes_outside_outputs_are_refused_and_the_host_is_unchanged(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    attempts = {
        "input_file": "echo evil > /workspace/data.txt",
        "input_folder": "echo evil > /workspace/folder/new.txt",
        "remove_input": "rm -f /workspace/data.txt && [ ! -e /workspace/data.txt ]",
        "workspace": "echo evil > /workspace/new.txt",
        "root": "echo evil > /escape.txt",
        "params": "echo evil > /pipe/params.json",
        "upstream": "echo evil > /inputs/up/made.txt",
        "upstream_new": "echo evil > /inputs/up/new.txt",
        "upstream_rm": "rm -f /inputs/up/made.txt && [ ! -e /inputs/up/made.txt ]",
    }
    stages: dict[str, Any] = {"up": {"image": BUSYBOX, "command": "echo made > /outputs/made.txt"}}
    for name, script in attempts.items():
        stages[name] = {
            "image": BUSYBOX,
            "command": script,
            "inputs": ["data.txt", "folder"],
            "needs": ["up"],
            "params": {"p": 1},
        }
    path = make_pipeline({"stages": stages}, files={"data.txt": "data\n", "folder/inside.txt": "inside\n"})
    before = snapshot(path.parent)
    done = pipe("run", path, "--keep-going")
    assert done.returncode == 1, done.stdout + done.stderr
    report = pipe_json("status", path)
    assert {n: s["status"] for n, s in report["stages"].items()} == {
        "up": "succeeded", **{name: "failed" for name in attempts}
    }
    for name in attempts:
        assert any("Read-only file system" in line for line in stage_lines(done.stdout, name)), name
    assert snapshot(path.parent) == before
    up = Path(report["stages"]["up"]["outputs_path"])
    assert sorted(p.name for p in up.iterdir()) == ["made.txt"]
    assert (up / "made.txt").read_text() == "made\n"
    params = path.parent / "runs" / report["run"]["id"] / ".pipe"
    assert all(json.loads((params / name / "params.json").read_text()) == {"p": 1} for name in attempts)


def plant_links(host_file: Path, host_dir: Path, project: Path) -> str:
    return (
        f"ln -s {host_file} /outputs/leak; "
        "ln -s ../../.. /outputs/up; "
        "ln -s /etc/passwd /outputs/passwd; "
        f"ln -s {project}/pipeline.yaml /outputs/spec; "
        f"mkdir /outputs/d && ln -s {host_dir} /outputs/d/hostdir; "
        "echo real > /outputs/real.txt"
    )


READ_LINKS = (
    "cat /inputs/plant/leak; cat /inputs/plant/d/hostdir/{name}; cat /inputs/plant/spec; "
    "ls /inputs/plant/up/; "
    "cat /inputs/plant/real.txt; true"
)


def test_planted_symlinks_are_stored_as_links_and_never_followed(
    docker: Any, make_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    token = unique("host-only")
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    host_file = host_dir / "secret.txt"
    host_file.write_text(token + "\n")
    host_file.chmod(0o640)
    host_state = (host_file.stat().st_mode, host_file.stat().st_nlink, host_dir.stat().st_mode)
    project = tmp_path / "project"
    path = make_pipeline({"stages": {
        "plant": {"image": BUSYBOX, "command": plant_links(host_file, host_dir, project)},
        "read": {"image": BUSYBOX, "command": READ_LINKS.format(name=host_file.name), "needs": ["plant"]},
    }})
    before = snapshot(project)
    first = run_ok(path)
    first_id = pipe_json("status", path)["run"]["id"]
    second = run_ok(path, "--force-stage", "read")  # plant restored from the cache, read mounts the restored links
    report = pipe_json("show", "latest", path)
    assert stages_of(report)["plant"]["status"] == "cached"

    for done in (first, second):
        out = stage_lines(done.stdout, "read")
        assert token not in done.stdout + done.stderr
        assert "real" in out
        # ../../.. from runs/<id>/plant is the project folder on the host; in the container it is its own root
        assert "pipeline.yaml" not in out and "runs" not in out
        assert "workspace" in out and "inputs" in out
    runs = project / "runs"
    for run_id in (first_id, report["id"]):
        plant = runs / run_id / "plant"
        assert os.readlink(plant / "leak") == str(host_file)
        assert os.readlink(plant / "up") == "../../.."
        assert os.readlink(plant / "passwd") == "/etc/passwd"
        assert os.readlink(plant / "d" / "hostdir") == str(host_dir)
    assert files_holding(runs, token.encode()) == []
    blobs = list(every_file(runs / "cache" / "blobs"))
    assert [b.read_bytes() for b in blobs] == [b"real\n"], "only the real file has a blob"
    artifacts = {a["path"]: a["size"] for a in stages_of(report)["plant"]["artifacts"]}
    assert artifacts["leak"] == 0 and artifacts["real.txt"] == 5
    assert (host_file.stat().st_mode, host_file.stat().st_nlink, host_dir.stat().st_mode) == host_state
    assert host_file.read_text() == token + "\n"
    assert snapshot(project) == before


def test_metrics_behind_a_planted_folder_link_are_not_read(
    docker: Any, make_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    value = 9_000_000 + secrets.randbelow(999_999)
    (host_dir / "metrics.json").write_text(json.dumps({"stolen": value}))
    path = make_pipeline({"stages": {
        "plant": {"image": BUSYBOX, "command": f"ln -s {host_dir} /outputs/m", "metrics": "m/metrics.json"},
    }})
    done = pipe("run", path)
    assert done.returncode == 1, done.stdout + done.stderr
    report = pipe_json("show", "latest", path)
    assert stages_of(report)["plant"]["status"] == "failed"
    assert "metrics file m/metrics.json was not written to /outputs" in stages_of(report)["plant"]["reason"]
    assert str(value) not in json.dumps(report)
    assert files_holding(path.parent / "runs", str(value).encode()) == []


def test_a_fifo_planted_in_outputs_fails_the_stage_not_pipe(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {
        "plant": {"image": BUSYBOX, "command": "mkfifo /outputs/pipe && echo planted"},
        "after": {"image": BUSYBOX, "command": "cat /inputs/plant/pipe", "needs": ["plant"]},
    }})
    done = pipe("run", path, timeout=120)  # reading the fifo would block pipe for ever
    assert done.returncode == 1, done.stdout + done.stderr
    report = pipe_json("show", "latest", path)
    stages = stages_of(report)
    assert stages["plant"]["status"] == "failed" and not stages["plant"]["infra_error"]
    assert "is a fifo, socket or device" in stages["plant"]["reason"]
    assert stages["after"]["status"] == "skipped"
    assert not list((path.parent / "runs" / "cache").rglob("*.json")), "a failed stage is never cached"


READ_ONLY_FOLDER = "mkdir -p /outputs/d/e && echo a > /outputs/d/e/a.txt && chmod 500 /outputs/d/e /outputs/d"


def test_read_only_folders_left_by_a_failed_attempt_do_not_stop_the_retry(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {"flaky": {
        "image": BUSYBOX, "command": f"{READ_ONLY_FOLDER} && echo attempt; exit 1",
        "retries": 1, "retry_delay": "10ms", "retry_on": ["error"],
    }}})
    done = subprocess.run(unprivileged("run", path), capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    stage = stages_of(pipe_json("show", "latest", path))["flaky"]
    assert stage["attempts"] == 2 and stage["reason"] == "exited with code 1 (after 2 attempts)", stage
    assert stage_lines(done.stdout, "flaky") == ["attempt", "attempt"]


def test_read_only_folders_of_a_cancelled_stage_are_discarded(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    path = make_pipeline({"stages": {"slow": {
        "image": BUSYBOX, "command": f"{READ_ONLY_FOLDER} && echo started; sleep 60",
    }}})
    proc = subprocess.Popen(unprivileged("run", path), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    wait_for(lambda: "slow | started" in (proc.stdout.readline() or ""), what="the stage to start")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    report = pipe_json("status", path)
    assert report["stages"]["slow"]["status"] == "cancelled"
    assert not (path.parent / "runs" / report["run"]["id"] / "slow").exists(), "partial outputs are discarded"


def test_an_undeclared_host_file_is_invisible(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    token = unique("undeclared")
    script = (
        "cat /workspace/notes.txt; cat notes.txt; cat ../notes.txt; cat /workspace/../notes.txt; "
        "cat folder/link; cat folder/abs; "
        "echo found: $(find / -name notes.txt 2>/dev/null | wc -l); "
        "echo listing: $(ls -A /workspace | tr '\\n' ' '); cat data.txt; true"
    )
    path = make_pipeline(
        {"stages": {"peek": {"image": BUSYBOX, "command": script, "inputs": ["data.txt", "folder"]}}},
        files={"data.txt": "declared\n", "notes.txt": token + "\n", "folder/x.txt": "x\n"},
    )
    (path.parent / "folder" / "link").symlink_to("../notes.txt")  # inside the folder, so the loader allows it
    (path.parent / "folder" / "abs").symlink_to(path.parent / "notes.txt")
    before = snapshot(path.parent)
    done = run_ok(path)
    out = stage_lines(done.stdout, "peek")
    assert token not in done.stdout + done.stderr
    assert "declared" in out, "the declared input is visible, so the probe itself works"
    assert "found: 0" in out
    assert "listing: data.txt folder" in out
    assert snapshot(path.parent) == before


# ---------------------------------------------------------------------------------------- users and modes


@pytest.fixture
def user_image(docker: Any) -> Iterator[str]:
    """A pipeline name whose `img` build context makes an image with a non-root USER; the tag is removed after."""
    name = unique("sbx-owner")
    yield name
    for image in docker.images.list(filters={"reference": f"pipe/{name}-*"}):
        for tag in image.tags:
            docker.images.remove(tag)


def run_with_umask(path: Path, umask: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", f'umask {umask:03o} && exec "$0" -m orchestrator run "$1"', sys.executable, str(path)],
        capture_output=True, text=True, check=False, timeout=300,
    )


def test_outputs_belong_to_the_invoking_user_and_state_is_private(
    docker: Any, make_pipeline: Callable[..., Path], user_image: str
) -> None:
    uid, gid = os.getuid(), os.getgid()
    image_user = "4242:4242" if uid != 4242 else "4343:4343"
    write = "id -u; id -g; mkdir /outputs/sub && echo a > /outputs/a.txt && echo b > /outputs/sub/b.txt"
    path = make_pipeline(
        {"name": user_image, "stages": {
            "mine": {"build": "img", "command": write},  # the image says USER 4242; pipe runs it as you
            "asked": {"image": BUSYBOX, "command": "id -u; echo r > /outputs/r.txt", "user": "root"},
        }},
        files={"img/Dockerfile": f"FROM {BUSYBOX}\nUSER {image_user}\n"},
    )
    done = run_with_umask(path, 0)  # modes must not depend on the caller's umask
    assert done.returncode == 0, done.stdout + done.stderr
    assert stage_lines(done.stdout, "mine") == [str(uid), str(gid)]
    assert stage_lines(done.stdout, "asked") == ["0"]
    report = pipe_json("show", "latest", path)
    stages = stages_of(report)
    assert stages["mine"]["user"] == f"{uid}:{gid}"
    assert stages["asked"]["user"] in ("0:0", "root")
    mine = Path(stages["mine"]["outputs_path"])
    owned = [mine, *mine.rglob("*")]
    assert len(owned) == 4
    assert {(p.stat().st_uid, p.stat().st_gid) for p in owned} == {(uid, gid)}

    state = path.parent / "runs"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    databases = sorted(state.glob("pipe.db*"))
    assert state / "pipe.db" in databases
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in databases} == {p.name: 0o600 for p in databases}
    blobs = list(every_file(state / "cache" / "blobs"))
    assert len(blobs) == 3
    assert all(p.stat().st_mode & 0o222 == 0 for p in blobs), "cache blobs are read-only"


def test_forbidden_container_keys_are_validation_errors(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    forbidden: dict[str, Any] = {
        "privileged": True,
        "network_mode": "host",
        "volumes": ["/:/host"],
        "cap_add": ["SYS_ADMIN"],
        "pid": "host",
        "devices": ["/dev/sda"],
        "security_opt": ["seccomp=unconfined"],
    }
    for key, value in forbidden.items():
        path = make_pipeline({"stages": {"s": {"image": BUSYBOX, "command": "true", key: value}}})
        since = time.time()
        done = pipe("run", path)
        assert done.returncode == 2, (key, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), lines
        assert f"stages.s.{key}: unknown key" in lines[0]
        assert containers_created(docker, path.parent / "runs", since) == 0


# ---------------------------------------------------------------------------------------- network


def test_network_only_when_asked_and_history_says_so(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    probe = "echo nets: $(ls /sys/class/net | sort | tr '\\n' ' ')"
    path = make_pipeline({"stages": {
        "offline": {"image": BUSYBOX, "command": probe},
        "online": {"image": BUSYBOX, "command": probe, "network": True},
    }})
    done = run_ok(path)
    assert stage_lines(done.stdout, "offline") == ["nets: lo"]
    online = stage_lines(done.stdout, "online")[0].split()[1:]
    assert "lo" in online and len(online) >= 2, online
    stages = stages_of(pipe_json("show", "latest", path))
    assert stages["offline"]["hermetic"] is True
    assert stages["online"]["hermetic"] is False


# ---------------------------------------------------------------------------------------- secrets

SECRET_SCRIPT = (
    'v="$(cat /run/secrets/{name})"; '
    "echo mode: $(stat -c '%a %u' /run/secrets/{name}); "
    'echo "plain $v"; echo "pre${{v}}post twice $v$v"; echo "to stderr $v" >&2; '
    "echo env: $(env | grep -c {name}); "
    "echo ok > /outputs/done.txt; echo waiting; "
    "i=0; while [ ! -e /tmp/release ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
)


def the_container(docker: Any, state: Path, stage: str) -> Any:
    return next(iter(docker.containers.list(filters={"label": [f"{LABEL_PIPELINE}={state}", f"{LABEL_STAGE}={stage}"]})), None)


def assert_nowhere(value: str, path: Path, texts: list[str]) -> None:
    """The value is in no file under the state folder (database files included) and in none of `texts`."""
    needle = value.encode()
    state = path.parent / "runs"
    assert files_holding(state, needle) == []
    for text in texts:
        assert value not in text
    for args in (("status",), ("show", "latest"), ("runs",)):
        done = pipe(*args, path, "--json")
        assert done.returncode == 0, done.stderr
        assert value not in done.stdout + done.stderr, args


def test_secret_reaches_the_stage_as_a_file_and_nowhere_else(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    name = "PIPE_E2E_API_TOKEN"
    value = unique("tok")
    path = make_pipeline({"stages": {
        "use": {"image": BUSYBOX, "command": SECRET_SCRIPT.format(name=name), "secrets": [name]},
    }})
    state = (path.parent / "runs").resolve()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(path)], text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, name: value},
    )
    try:
        container = wait_for(lambda: the_container(docker, state, "use"), what="the stage's container")
        wait_for(lambda: "waiting" in container.logs().decode(), what="the stage to print")
        attrs = docker.api.inspect_container(container.id)
        running_db = {p.name: p.read_bytes() for p in state.glob("pipe.db*")}
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.glob("pipe.db*")}
        container.exec_run(["touch", "/tmp/release"])
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stdout + stderr

    assert value not in json.dumps(attrs)
    assert not any(e.startswith(f"{name}=") for e in attrs["Config"]["Env"])
    host = attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] and not host["Privileged"]
    assert host["NetworkMode"] == "none" and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True and host["PidMode"] == "" and host["IpcMode"] == "private"
    assert host["Memory"] == host["MemorySwap"] == 4 * 1024**3 and host["PidsLimit"] == 1024  # the defaults
    assert host["Tmpfs"] == {"/tmp": f"rw,size={256 * 1024**2},mode=1777"}
    sources = [m["Source"] for m in attrs["Mounts"]]
    assert all(s.startswith((str(path.parent.resolve()) + "/", "/dev/shm/pipe-secrets-")) for s in sources), sources
    assert "/var/run/docker.sock" not in json.dumps(attrs)
    assert {"pipe.db", "pipe.db-wal"} <= running_db.keys()
    assert set(modes.values()) == {0o600}, modes
    assert not [n for n, data in running_db.items() if value.encode() in data]

    out = stage_lines(stdout, "use")
    assert f"mode: 400 {os.getuid()}" in out
    assert "plain ***" in out and "pre***post twice ******" in out and "to stderr ***" in out
    assert "env: 0" in out
    log = pipe("logs", "latest", "use", path)
    assert "pre***post twice ******" in log.stdout
    assert_nowhere(value, path, [stdout, stderr, log.stdout, log.stderr])

    rotated = unique("tok")  # a new value: nothing re-runs, and the new value leaks nowhere either
    since = time.time()
    done = run_ok(path, env={name: rotated})
    assert containers_created(docker, state, since) == 0
    assert pipe_json("status", path)["stages"]["use"]["status"] == "cached"
    assert_nowhere(rotated, path, [done.stdout, done.stderr])
    assert_nowhere(value, path, [])


def test_multi_line_secret_and_one_across_a_long_line_cut_are_redacted(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    key_lines = [unique("keyline") for _ in range(3)]
    key = "-----BEGIN TEST KEY-----\n" + "\n".join(key_lines) + "\n-----END TEST KEY-----\n"
    token = unique("longtok")
    # 65523 bytes, then the token in two writes: the 64 KiB cut of a long line (65536) falls 13 bytes into it
    script = (
        "cat /run/secrets/PEM_KEY; i=0; while [ $i -lt 6552 ]; do printf xxxxxxxxxx; i=$((i+1)); done; "
        "printf abc; head -c 16 /run/secrets/LONG_TOKEN; sleep 0.5; tail -c +17 /run/secrets/LONG_TOKEN; echo"
    )
    path = make_pipeline({"stages": {
        "print": {"image": BUSYBOX, "command": script, "secrets": ["PEM_KEY", "LONG_TOKEN"]},
    }})
    done = run_ok(path, env={"PEM_KEY": key, "LONG_TOKEN": token})
    assert "print | ***" in done.stdout
    log = pipe("logs", "latest", "print", path).stdout
    assert "abc***" in log
    for part in [*key_lines, token, token[:13], token[13:]]:
        assert part not in done.stdout + done.stderr + log
        assert files_holding(path.parent / "runs", part.encode()) == []


def unprivileged(*args: str | Path) -> list[str]:
    """`pipe ARGS` without root's power over file modes, as any other user runs it (uid stays; the engine's
    socket still answers)."""
    command = [sys.executable, "-m", "orchestrator", *map(str, args)]
    if os.geteuid() != 0:
        return command
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's file capabilities"
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *command]


def secret_files_holding(value: str) -> list[Path]:
    """Files of pipe's secrets folders on the host tmpfs that hold `value`."""
    return [p for p in Path("/dev/shm").glob("pipe-secrets-*/**/*") if p.is_file() and value.encode() in p.read_bytes()]


def test_secret_files_leave_the_host_when_the_run_ends(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    value = unique("shmtok")
    path = make_pipeline({"stages": {
        "use": {"image": BUSYBOX, "command": "cat /run/secrets/SHM_TOKEN > /dev/null", "secrets": ["SHM_TOKEN"]},
    }})
    done = subprocess.run(
        unprivileged("run", path), capture_output=True, text=True, check=False, timeout=300,
        env={**os.environ, "SHM_TOKEN": value},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert secret_files_holding(value) == []


def test_secret_files_of_a_killed_run_are_removed_by_the_next(
    docker: Any, make_pipeline: Callable[..., Path]
) -> None:
    value = unique("killtok")
    path = make_pipeline({"stages": {
        "slow": {"image": BUSYBOX, "command": "echo started; sleep 120", "secrets": ["KILL_TOKEN"]},
    }})
    proc = subprocess.Popen(
        unprivileged("run", path), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "KILL_TOKEN": value},
    )
    try:
        assert proc.stdout is not None
        wait_for(lambda: "slow | started" in (proc.stdout.readline() or ""), what="the stage to start")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert secret_files_holding(value), "a SIGKILL leaves the secrets folder behind by necessity"
    path.write_text(path.read_text().replace("sleep 120", "true"))
    done = subprocess.run(
        unprivileged("run", path), capture_output=True, text=True, check=False, timeout=300,
        env={**os.environ, "KILL_TOKEN": unique("next")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert secret_files_holding(value) == []


def test_missing_secret_is_a_validation_error_naming_it(
    docker: Any, make_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    other = unique("other-value")
    secrets_file = tmp_path / "outside" / "secrets.env"
    secrets_file.parent.mkdir()
    secrets_file.write_text(f"OTHER_TOKEN={other}\n")
    path = make_pipeline({
        "secrets_file": str(secrets_file),
        "stages": {"use": {"image": BUSYBOX, "command": "true", "secrets": ["OTHER_TOKEN", "MISSING_TOKEN"]}},
    })
    since = time.time()
    done = pipe("run", path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "MISSING_TOKEN" in lines[0], lines
    assert other not in done.stdout + done.stderr
    assert containers_created(docker, path.parent / "runs", since) == 0


def test_secret_from_a_secrets_file_outside_the_project(
    docker: Any, make_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    value = unique("filetok")
    secrets_file = tmp_path / "outside" / "secrets.env"
    secrets_file.parent.mkdir()
    secrets_file.write_text(f"# kept outside the repository\nFILE_TOKEN={value}\n")
    script = (
        "echo sha: $(sha256sum /run/secrets/FILE_TOKEN | cut -d' ' -f1); "
        "echo mode: $(stat -c '%a' /run/secrets/FILE_TOKEN); echo value: $(cat /run/secrets/FILE_TOKEN)"
    )
    path = make_pipeline({
        "secrets_file": str(secrets_file),
        "stages": {"use": {"image": BUSYBOX, "command": script, "secrets": ["FILE_TOKEN"]}},
    })
    done = run_ok(path)
    out = stage_lines(done.stdout, "use")
    assert f"sha: {hashlib.sha256(value.encode()).hexdigest()}" in out
    assert "mode: 400" in out and "value: ***" in out
    assert_nowhere(value, path, [done.stdout, done.stderr])


# ---------------------------------------------------------------------------------------- container defaults

PROBE = (
    "grep -E '^(NoNewPrivs|CapEff|CapPrm|Seccomp):' /proc/self/status; "
    "touch /escape 2>/dev/null && echo root-writable || echo root-read-only; "
    "echo hi > /tmp/probe && echo tmp-writable; "
    "echo HOME=$HOME; echo id=$(id -u):$(id -g); "
    "echo routes=$(tail -n +2 /proc/net/route | wc -l)"
)


def test_container_defaults_from_inside(docker: Any, make_pipeline: Callable[..., Path]) -> None:
    path = make_pipeline({"stages": {
        "probe": {"image": BUSYBOX, "command": PROBE},
        "root": {"image": BUSYBOX, "command": PROBE, "user": "root"},
    }})
    done = run_ok(path)
    for stage, uid_gid in (("probe", f"{os.getuid()}:{os.getgid()}"), ("root", "0:0")):
        out = [" ".join(line.split()) for line in stage_lines(done.stdout, stage)]
        assert "NoNewPrivs: 1" in out, (stage, out)
        assert "CapEff: 0000000000000000" in out and "CapPrm: 0000000000000000" in out
        assert "Seccomp: 2" in out, "the engine's default seccomp filter"
        assert "root-read-only" in out and "tmp-writable" in out
        assert "HOME=/tmp" in out
        assert f"id={uid_gid}" in out
        assert "routes=0" in out
