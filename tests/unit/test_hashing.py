"""hashing: canonical values, files, and folder digests with a stat-keyed memo, on real files in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from blake3 import blake3

from orchestrator.errors import PipeError
from orchestrator.hashing import (
    MMAP_MIN_BYTES,
    DictMemo,
    HashMemo,
    canonical_hash,
    hash_bytes,
    hash_file,
    hash_link,
    hash_tree,
    stat_key,
)

OLD_NS = 1_600_000_000 * 10**9  # 2020: far outside the racy window


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def age(root: Path) -> None:
    """Give every file an old mtime, as real inputs have, so the memo accepts them."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, ns=(OLD_NS, OLD_NS))


def test_canonical_hash_is_stable_across_dict_order() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    b = {"a": {"x": "é", "y": [1, 2]}, "b": 1}
    assert canonical_hash(a) == canonical_hash(b)
    assert canonical_hash(a) == blake3('{"a":{"x":"é","y":[1,2]},"b":1}'.encode()).hexdigest()
    assert canonical_hash({"a": 1}) != canonical_hash({"a": "1"})
    assert canonical_hash((1, 2)) == canonical_hash([1, 2])


def test_hash_file_matches_blake3_of_content_small_and_mmapped(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"hello")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(MMAP_MIN_BYTES + 12345))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hash_file(small) == hash_bytes(b"hello")
    assert hash_file(big) == blake3(big.read_bytes()).hexdigest()
    assert hash_file(empty) == hash_bytes(b"")


def test_tree_digest_of_a_file_is_its_content_digest(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("a,b\n1,2\n")
    tree = hash_tree(path)
    assert tree.digest == hash_bytes(b"a,b\n1,2\n")
    assert [(f.path, f.size) for f in tree.files] == [("raw.csv", 8)]


def test_tree_lists_files_sorted_with_sizes(tmp_path: Path) -> None:
    make_tree(tmp_path, {"b/z.txt": "zz", "a.txt": "a", "b/c/d.txt": "ddd"})
    tree = hash_tree(tmp_path)
    assert [f.path for f in tree.files] == ["a.txt", "b/c/d.txt", "b/z.txt"]
    assert tree.total_size == 6
    assert tree.files[0].digest == hash_bytes(b"a")


def test_empty_folder_has_a_stable_digest(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    assert hash_tree(tmp_path / "one").digest == hash_tree(tmp_path / "two").digest
    assert hash_tree(tmp_path / "one").files == ()


def test_tree_digest_changes_on_rename(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.txt": "x"})
    before = hash_tree(tmp_path).digest
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert hash_tree(tmp_path).digest != before


def test_tree_digest_changes_on_content(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.txt": "x"})
    before = hash_tree(tmp_path).digest
    (tmp_path / "a.txt").write_text("y")
    assert hash_tree(tmp_path).digest != before


def test_tree_digest_changes_on_exec_bit(tmp_path: Path) -> None:
    make_tree(tmp_path, {"run.sh": "echo"})
    before = hash_tree(tmp_path)
    (tmp_path / "run.sh").chmod(0o755)
    after = hash_tree(tmp_path)
    assert after.digest != before.digest
    assert after.files[0].executable and not before.files[0].executable


def test_tree_digest_changes_on_empty_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.txt": "x"})
    before = hash_tree(tmp_path).digest
    (tmp_path / "logs" / "empty").mkdir(parents=True)
    after = hash_tree(tmp_path)
    assert after.digest != before
    assert after.empty_dirs == ("logs/empty",)


def test_tree_digest_unchanged_on_touch(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.txt": "x", "sub/b.txt": "y"})
    before = hash_tree(tmp_path).digest
    os.utime(tmp_path / "a.txt", ns=(OLD_NS, OLD_NS))
    (tmp_path / "sub" / "b.txt").touch()
    assert hash_tree(tmp_path).digest == before


def test_symlink_is_an_entry_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("host secret")
    tree_root = make_tree(tmp_path / "out", {"a.txt": "x"})
    (tree_root / "leak").symlink_to(secret)
    (tree_root / "loop").symlink_to(tree_root)  # following it would never end
    tree = hash_tree(tree_root)
    links = {f.path: f for f in tree.files if f.link is not None}
    assert links["leak"].link == str(secret)
    assert links["leak"].digest == hash_link(str(secret)) == hash_bytes(b"link:" + str(secret).encode())
    assert links["leak"].size == 0
    before = tree.digest
    secret.write_text("changed")  # the target's content does not enter the digest
    assert hash_tree(tree_root).digest == before


def test_tree_digest_changes_on_symlink_target(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.txt": "x", "b.txt": "x"})
    (tmp_path / "current").symlink_to("a.txt")
    before = hash_tree(tmp_path).digest
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to("b.txt")
    assert hash_tree(tmp_path).digest != before


def test_symlink_differs_from_a_file_holding_its_link_text(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x").symlink_to("t")
    make_tree(tmp_path / "two", {"x": "link:t"})
    assert hash_tree(tmp_path / "one").digest != hash_tree(tmp_path / "two").digest


def test_symlinked_root_is_hashed_as_its_target(tmp_path: Path) -> None:
    make_tree(tmp_path / "v2", {"a.txt": "x"})
    (tmp_path / "data").symlink_to("v2")
    assert hash_tree(tmp_path / "data").digest == hash_tree(tmp_path / "v2").digest


def test_memo_hit_reads_no_content(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("aaaa")
    age(tmp_path)
    memo = DictMemo()
    first = hash_tree(tmp_path, memo)
    assert memo.digests == {(str(path), stat_key(path.stat())): hash_bytes(b"aaaa")}
    # Same inode, size and mtime, different bytes: only a memo hit can still answer "aaaa".
    with open(path, "r+") as f:
        f.write("bbbb")
    os.utime(path, ns=(OLD_NS, OLD_NS))
    assert hash_tree(tmp_path, memo).digest == first.digest
    assert hash_tree(tmp_path).digest != first.digest  # without the memo the new bytes are read


def test_memo_miss_on_size_or_mtime_change(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("aaaa")
    age(tmp_path)
    memo = DictMemo()
    first = hash_tree(tmp_path, memo).digest
    path.write_text("bbbb")  # a real edit moves the mtime
    os.utime(path, ns=(OLD_NS + 1, OLD_NS + 1))
    assert hash_tree(tmp_path, memo).digest != first


def test_recent_file_is_not_memoised(tmp_path: Path) -> None:
    """A file written within the racy window may change again within one mtime tick: do not trust its stat."""
    make_tree(tmp_path, {"fresh.txt": "x"})
    memo = DictMemo()
    hash_tree(tmp_path, memo)
    assert memo.digests == {}


class CountingMemo(DictMemo):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    def get(self, path: str, key: tuple[int, int, int, int]) -> str | None:
        self.gets += 1
        return super().get(path, key)


def test_many_files_hash_in_parallel_and_memoise(tmp_path: Path) -> None:
    make_tree(tmp_path, {f"d{i % 7}/f{i}.txt": f"content {i}" for i in range(300)})
    age(tmp_path)
    memo = CountingMemo()
    parallel = hash_tree(tmp_path, memo, workers=4)
    assert parallel == hash_tree(tmp_path, workers=1)
    assert len(memo.digests) == 300
    assert hash_tree(tmp_path, memo).digest == parallel.digest
    assert memo.gets == 600


def test_dict_memo_is_a_hash_memo() -> None:
    memo: HashMemo = DictMemo()
    memo.put("/a", (1, 2, 3, 4), "d")
    memo.flush()
    assert memo.get("/a", (1, 2, 3, 4)) == "d"
    assert memo.get("/a", (1, 2, 3, 5)) is None


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(PipeError, match=r"^cannot read .*nope: No such file or directory"):
        hash_tree(tmp_path / "nope")


def test_fifo_is_refused_with_its_path(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PipeError, match=r"pipe is a fifo, socket or device"):
        hash_tree(tmp_path)
