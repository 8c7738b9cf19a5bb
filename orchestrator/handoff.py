"""The swarm hand-off, host side and node side: a stage's read-only mount sources go to the object store by content
digest before its task, and its /outputs come back after it (docs/architecture.md, "Swarm hand-off").

Host side (here, with the ObjectStore): a mount source is packed as a deterministic tar (sorted, mtime 0, owner 0),
named by its sha256 under handoff/tars/, and found again by the tree digest of the source (handoff/trees/<digest>),
so a source whose content is already there is neither packed nor sent. Outputs come back as the tar the node's
agent made, checked against the sha256 it printed, and unpacked with tarfile's `data` filter (no absolute paths,
no links out, no devices). The unpacked outputs are registered under their own tree digest, so a downstream stage
that mounts them does not send them again.

Node side: the agent's shell scripts (busybox sh, rclone), which run in the agent task on the stage's node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import RemoteError
from orchestrator.hashing import hash_tree
from orchestrator.objectstore import ObjectStore

FILE_NAME = "f"  # the one member of a file source's tar


@dataclass(frozen=True)
class Staged:
    """A mount source in the store: its tar's key and sha256, and whether it is a single file."""

    key: str
    sha256: str
    is_file: bool


def tree_key(digest: str) -> str:
    return f"handoff/trees/{digest}.json"


def pack(source: Path, dest: Path) -> str:
    """Write `source` (a folder's content, or one file as FILE_NAME) to the tar `dest`; its sha256. The bytes
    depend only on names, content, modes and link targets, so equal content gives an equal tar."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        if not source.is_dir():
            tar.add(source, arcname=FILE_NAME, filter=clean)
        else:
            for folder, dirs, files in os.walk(source):
                dirs.sort()
                rel = Path(folder).relative_to(source)
                if rel != Path("."):
                    tar.add(folder, arcname=str(rel), recursive=False, filter=clean)
                for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(folder, d))):
                    tar.add(os.path.join(folder, name), arcname=str(rel / name), recursive=False, filter=clean)
    return _sha256(dest)


def stage_source(store: ObjectStore, source: Path) -> Staged:
    """Put `source` into the store unless content equal to it is there already; where it is."""
    is_file = not source.is_dir()
    digest = hash_tree(source).digest
    known = store.get_bytes(tree_key(digest))
    if known is not None:
        entry = json.loads(known)
        if store.exists(entry["key"]):
            return Staged(entry["key"], entry["sha256"], is_file)
    with tempfile.TemporaryDirectory(prefix="pipe-handoff-") as tmp:
        tar = Path(tmp) / "source.tar"
        sha = pack(source, tar)
        key = f"handoff/tars/{sha}.tar"
        if not store.exists(key):
            store.put_file(key, tar)
    store.put_bytes(tree_key(digest), json.dumps({"key": key, "sha256": sha}).encode())
    return Staged(key, sha, is_file)


def fetch_outputs(store: ObjectStore, key: str, sha256: str, dest: Path) -> None:
    """Unpack the outputs tar at `key` into the empty folder `dest`, then register it by its tree digest."""
    with tempfile.TemporaryDirectory(prefix="pipe-handoff-", dir=dest.parent) as tmp:
        tar_path = Path(tmp) / "outputs.tar"
        store.get_file_sha256(key, tar_path, sha256)
        try:
            with tarfile.open(tar_path) as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise RemoteError(f"the outputs of the swarm task could not be unpacked: {e}") from e
    store.put_bytes(tree_key(hash_tree(dest).digest), json.dumps({"key": key, "sha256": sha256}).encode())


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


# -- the agent's scripts (busybox sh and rclone in the agent image; the store is the rclone remote "s3") -------

AGENT_ROOT = "/h"  # where the node's hand-off folder is mounted in an agent task
SHA_MARK = "pipe-outputs-sha256="


def remote_path(bucket_prefix: str, key: str) -> str:
    return f"s3:{bucket_prefix}{key}"


def fetch_script(task_dir: str, staged: list[tuple[int, Staged]], outputs: list[int], owner: str,
                 bucket_prefix: str) -> str:
    """Make the task's folders m<i> under AGENT_ROOT/task_dir, unpack each staged source into its folder (after a
    sha256 check), and give the writable ones to the stage's user."""
    t = f"{AGENT_ROOT}/{task_dir}"
    lines = ["set -eu", f"mkdir -p {shlex.quote(t)}"]
    for i, item in staged:
        tar = f"{t}/.m{i}.tar"
        lines += [
            f"mkdir -p {t}/m{i}",
            f"rclone copyto --retries 3 {shlex.quote(remote_path(bucket_prefix, item.key))} {tar}",
            f'echo "{item.sha256}  {tar}" | sha256sum -c -s',
            f"tar -x -f {tar} -C {t}/m{i}",
            f"rm -f {tar}",
            f"chmod -R a+rX {t}/m{i}",
        ]
    for i in outputs:
        lines += [f"mkdir -p {t}/m{i}", f"chown {owner} {t}/m{i}", f"chmod 0755 {t}/m{i}"]
    lines.append(f"chmod 0755 {t} && chmod 0711 {AGENT_ROOT}/{task_dir.split('/')[0]}")
    return "\n".join(lines)


def push_script(task_dir: str, output: int | None, key: str, bucket_prefix: str) -> str:
    """Pack the stage's outputs folder, send it, print its sha256 after SHA_MARK; then remove the task's folder
    (and the run's, once empty), whatever happened. With output None it only removes."""
    t = f"{AGENT_ROOT}/{task_dir}"
    run_dir = f"{AGENT_ROOT}/{task_dir.split('/')[0]}"
    clean = f"trap 'rm -rf {t}; rmdir {run_dir} 2>/dev/null || true' EXIT"
    if output is None:
        return f"set -eu\n{clean}\ntrue"
    tar = f"{t}/.out.tar"
    return "\n".join([
        "set -eu", clean,
        f"tar -c -f {tar} -C {t}/m{output} .",
        f'echo "{SHA_MARK}$(sha256sum {tar} | cut -d" " -f1)"',
        f"rclone copyto --retries 3 {tar} {shlex.quote(remote_path(bucket_prefix, key))}",
    ])


def rclone_config(endpoint: str, access_key: str, secret_key: str) -> str:
    """The agent's rclone config (delivered as a swarm secret, never in the environment)."""
    return (f"[s3]\ntype = s3\nprovider = Other\nendpoint = {endpoint}\naccess_key_id = {access_key}\n"
            f"secret_access_key = {secret_key}\nforce_path_style = true\n")


def sweep_script(run_ids: list[str]) -> str:
    """Remove the hand-off folders of dead runs on a node."""
    return "\n".join(["set -u"] + [f"rm -rf {AGENT_ROOT}/{shlex.quote(r)}" for r in run_ids] + ["true"])
