"""The swarm hand-off, host side and node side: a stage's read-only mount sources reach its node through the object
store before its task, and its /outputs go to the store after it (docs/architecture.md, "Swarm hand-off").

Sources from this host (inputs, outputs of stages restored here) are packed as a deterministic tar (sorted,
mtime 0, owner 0), named by its sha256 under handoff/tars/, and found again by the tree digest of the source
(handoff/trees/<digest>), so a source whose content is already there is neither packed nor sent.

Outputs never come through a tar: the push step hashes them on the node (b3sum: the blake3 every digest of pipe
is), sends each distinct content to the remote cache's blobs/ (remote.py's layout; a blob there already is not
sent again) and the folder's listing last. The host reads the listing (read_listing) and so knows the outputs'
TreeDigest, a cache manifest's very content, without the bytes: they come to the host only when asked
(--fetch), and a downstream stage's node takes them from blobs/ by a list the host writes (stage_tree), so
outputs that stay on the cluster never cross the invoking host.

Node side: the agent's shell scripts (busybox sh, rclone, b3sum), which run in the agent task on the stage's node.
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
from orchestrator.hashing import FileEntry, TreeDigest, hash_link, hash_tree, tree_of
from orchestrator.objectstore import ObjectStore
from orchestrator.remote import BLOBS

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


@dataclass(frozen=True)
class StagedTree:
    """A mount source whose content is in the store's blobs: the key and sha256 of the list the node fetches by."""

    key: str
    sha256: str


def stage_tree(store: ObjectStore, tree: TreeDigest) -> StagedTree:
    """The fetch list of `tree` (files and empty folders first, links last; tab separated) in the store under
    its digest, sent unless there. RemoteError for a tree the agent's shell cannot place: a name with a tab or
    a newline, a path leaving the folder, a link that would be a parent of another entry."""
    links = {e.path for e in tree.files if e.link is not None}
    rows = [*(("f", e.digest, "x" if e.executable else "-", e.path) for e in tree.files if e.link is None),
            *(("d", "-", "-", d) for d in tree.empty_dirs),
            *(("l", e.link or "", "-", e.path) for e in tree.files if e.link is not None)]
    for _, first, _, path in rows:
        parts = path.split("/")
        if any(c in path + first for c in "\t\n") or path.startswith("/") or ".." in parts or \
                any("/".join(parts[:n]) in links for n in range(1, len(parts))):
            raise RemoteError(f"cannot hand {path!r} on to another node (a tab or newline in a name, or a path "
                              "through a link or out of the folder)")
    data = "".join("\t".join(row) + "\n" for row in rows).encode("utf-8", "surrogateescape")
    key = f"handoff/lists/{tree.digest}.tsv"
    if not store.exists(key):
        store.put_bytes(key, data)
    return StagedTree(key, hashlib.sha256(data).hexdigest())


def read_listing(store: ObjectStore, key: str, sha256: str) -> TreeDigest:
    """The outputs' TreeDigest from the listing a push step sent to `key` (checked against the sha256 it
    printed). RemoteError when the listing is missing, altered or does not add up."""
    data = store.get_bytes(key)
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        raise RemoteError(f"the outputs listing {key} in {store.url} is missing or altered")
    return parse_listing(data)


def parse_listing(data: bytes) -> TreeDigest:
    """push_script's listing: `#sums` (b3sum's `digest  ./path`), `#stats` (`size mode ./path`), `#links`
    (`./path<TAB>target`), `#empty` (`./path`), each path as find printed it; names as bytes, decoded as the
    file system's (os.fsdecode, as hash_tree's os.scandir does)."""
    sections: dict[bytes, list[bytes]] = {}
    current: list[bytes] | None = None
    for line in data.split(b"\n"):
        if line.startswith(b"#"):
            current = sections.setdefault(line[1:], [])
        elif line and current is not None:
            current.append(line)

    def rel(path: bytes) -> str:
        if not path.startswith(b"./"):
            raise RemoteError(f"the outputs listing names {path!r}, not a path under /outputs")
        return os.fsdecode(path[2:])

    try:
        sums = {rel(line[66:]): line[:64].decode() for line in sections.get(b"sums", [])}
        stats = {}
        for line in sections.get(b"stats", []):
            size, mode, path = line.split(b" ", 2)
            stats[rel(path)] = (int(size), int(mode, 8))
        links = [line.split(b"\t", 1) for line in sections.get(b"links", [])]
        files = [FileEntry(path, stats[path][0], digest, bool(stats[path][1] & 0o100))
                 for path, digest in sums.items()]
        files += [FileEntry(rel(path), 0, hash_link(os.fsdecode(target)), False, os.fsdecode(target))
                  for path, target in links]
        empty = [rel(line) for line in sections.get(b"empty", [])]
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise RemoteError(f"the outputs listing does not add up ({e!r})") from None
    if set(sums) != set(stats) or any(len(d) != 64 for d in sums.values()):
        raise RemoteError("the outputs listing does not add up (digests and sizes of different files)")
    return tree_of(files, empty)


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


# -- the agent's scripts (busybox sh and rclone in the agent image; the store is the rclone remote "s3") -------

AGENT_ROOT = "/h"  # where the node's hand-off folder is mounted in an agent task
LISTING_MARK = "pipe-outputs-listing-sha256="
ERROR_MARK = "pipe-outputs-error="


def remote_path(bucket_prefix: str, key: str) -> str:
    return f"s3:{bucket_prefix}{key}"


def fetch_script(task_dir: str, staged: list[tuple[int, Staged | StagedTree]], outputs: list[int], owner: str,
                 bucket_prefix: str, root: str = AGENT_ROOT) -> str:
    """Make the task's folders m<i> under root/task_dir, fill each read-only one (a tar unpacked after a sha256
    check, or a tree placed from blobs checked by b3sum), and give the writable ones to the stage's user."""
    t = f"{root}/{task_dir}"
    lines = ["set -eu", f"mkdir -p {shlex.quote(t)}", "tab=$(printf '\\t')"]
    for i, item in staged:
        lines.append(f"mkdir -p {t}/m{i}")
        lines += _place_tree(t, i, item, bucket_prefix) if isinstance(item, StagedTree) else [
            f"rclone copyto --retries 3 {shlex.quote(remote_path(bucket_prefix, item.key))} {t}/.m{i}.tar",
            f'echo "{item.sha256}  {t}/.m{i}.tar" | sha256sum -c -s',
            f"tar -x -f {t}/.m{i}.tar -C {t}/m{i}",
            f"rm -f {t}/.m{i}.tar",
        ]
        lines.append(f"chmod -R a+rX {t}/m{i}")
    for i in outputs:
        lines += [f"mkdir -p {t}/m{i}", f"chown {owner} {t}/m{i}", f"chmod 0755 {t}/m{i}"]
    lines.append(f"chmod 0755 {t} && chmod 0711 {root}/{task_dir.split('/')[0]}")
    return "\n".join(lines)


def _place_tree(t: str, i: int, item: StagedTree, bucket_prefix: str) -> list[str]:
    """Fetch stage_tree's list, its distinct blobs into .b<i> (one rclone copy), check them with b3sum, then copy
    each file to its path (mode 0755 or 0644), make the empty folders, and the links last."""
    lst, blobs, m = f"{t}/.m{i}.tsv", f"{t}/.b{i}", f"{t}/m{i}"
    return [
        f"rclone copyto --retries 3 {shlex.quote(remote_path(bucket_prefix, item.key))} {lst}",
        f'echo "{item.sha256}  {lst}" | sha256sum -c -s',
        f"mkdir -p {blobs}",
        f"grep '^f' {lst} | cut -f2 | sort -u > {lst}.sums",
        f"sed 's|^\\(..\\)|\\1/\\1|' {lst}.sums > {lst}.keys",
        (f"rclone copy --retries 3 --no-traverse --files-from {lst}.keys "
        f"{shlex.quote(remote_path(bucket_prefix, BLOBS))} {blobs}"),
        f"sed 's|^\\(..\\)\\(.*\\)$|\\1\\2  \\1/\\1\\2|' {lst}.sums > {lst}.b3",
        f"(cd {blobs} && b3sum --check --quiet {lst}.b3)",
        'while IFS="$tab" read -r kind a x p; do case $kind in',
        f'  f) mkdir -p "$(dirname "{m}/$p")"; cp "{blobs}/${{a%${{a#??}}}}/$a" "{m}/$p"',
        f'     if [ "$x" = x ]; then chmod 0755 "{m}/$p"; else chmod 0644 "{m}/$p"; fi;;',
        f'  d) mkdir -p "{m}/$p";;',
        f'  l) mkdir -p "$(dirname "{m}/$p")"; ln -s "$a" "{m}/$p";;',
        f"esac; done < {lst}",
        f"rm -rf {blobs} {lst} {lst}.sums {lst}.keys {lst}.b3",
    ]


def push_script(task_dir: str, output: int | None, listing_key: str, bucket_prefix: str,
                root: str = AGENT_ROOT) -> str:
    """Hash the stage's outputs (b3sum), send each distinct content to blobs/ (hard links named by digest, one
    rclone copy that skips blobs the store has), then the listing parse_listing reads; print the listing's sha256
    after LISTING_MARK, or why not after ERROR_MARK. Then remove the task's folder (and the run's, once empty),
    whatever happened. With output None it only removes."""
    t = f"{root}/{task_dir}"
    run_dir = f"{root}/{task_dir.split('/')[0]}"
    clean = f"trap 'rm -rf {t}; rmdir {run_dir} 2>/dev/null || true' EXIT"
    if output is None:
        return f"set -eu\n{clean}\ntrue"
    lst, blobs = f"{t}/.listing", f"{t}/.blobs"
    fail = f'echo "{ERROR_MARK}$1"; exit 3'
    return "\n".join([
        "set -eu", clean, f"fail() {{ {fail}; }}", f"cd {t}/m{output}",
        "odd=$(find . ! -type d ! -type f ! -type l | head -n 1)",
        '[ -z "$odd" ] || fail "a fifo, socket or device in /outputs: ${odd#./}"',
        f"find . -type f -exec b3sum {{}} + > {lst}.sums",
        f"! grep -q '^\\\\' {lst}.sums || fail 'a file name with a backslash or a newline in /outputs'",
        f"find . -type f -exec stat -c '%s %a %n' {{}} + > {lst}.stats",
        (f"find . -type l -exec sh -c 'for l; do printf \"%s\\t%s\\n\" \"$l\" \"$(readlink \"$l\")\"; done' sh {{}} + "
        f"> {lst}.links"),
        (f"{{ echo '#sums'; cat {lst}.sums; echo '#stats'; cat {lst}.stats; echo '#links'; cat {lst}.links; "
        f"echo '#empty'; find . -mindepth 1 -type d -empty; }} > {lst}"),
        f"mkdir {blobs}",
        (f'while IFS= read -r line; do d=${{line%%  *}}; mkdir -p {blobs}/${{d%${{d#??}}}}; '
        f'ln -f "${{line#*  }}" {blobs}/${{d%${{d#??}}}}/$d; done < {lst}.sums'),
        (f"rclone copy --retries 3 --no-traverse --ignore-existing {blobs} "
        f"{shlex.quote(remote_path(bucket_prefix, BLOBS))}"),
        f"rclone copyto --retries 3 {lst} {shlex.quote(remote_path(bucket_prefix, listing_key))}",
        f'echo "{LISTING_MARK}$(sha256sum {lst} | cut -d" " -f1)"',
    ])


def rclone_config(endpoint: str, access_key: str, secret_key: str) -> str:
    """The agent's rclone config (delivered as a swarm secret, never in the environment)."""
    return (f"[s3]\ntype = s3\nprovider = Other\nendpoint = {endpoint}\naccess_key_id = {access_key}\n"
            f"secret_access_key = {secret_key}\nforce_path_style = true\n")


def sweep_script(run_ids: list[str]) -> str:
    """Remove the hand-off folders of dead runs on a node."""
    return "\n".join(["set -u"] + [f"rm -rf {AGENT_ROOT}/{shlex.quote(r)}" for r in run_ids] + ["true"])
