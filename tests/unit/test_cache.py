"""cache: key recipe, miss reasons, and save/lookup/restore/verify/gc on real files in tmp_path."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.cache import Cache, Lookup, Manifest
from orchestrator.cachekey import KEY_VERSION, Ingredients, explain_miss
from orchestrator.errors import PipeError
from orchestrator.fsops import FICLONE, clone
from orchestrator.hashing import hash_tree

IMAGE_A = "sha256:1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b"
IMAGE_B = "sha256:9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0"
RAW_A = "1a2b3c4d" + "0" * 56
RAW_B = "9f8e7d6c" + "0" * 56


def ingredients(**changes: object) -> Ingredients:
    base = Ingredients(
        image=IMAGE_A,
        command=("python3", "/app/train.py"),
        entrypoint=None,
        workdir="/workspace",
        env={"LOG_LEVEL": "info"},
        params={"n_estimators": 100, "model": {"depth": 3, "kind": "gb"}},
        inputs={"data/raw.csv": RAW_A},
        upstream={"data": "d" * 64},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def make_outputs(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.bin").write_bytes(b"weights" * 100)
    (root / "sub" / "metrics.json").write_text('{"r2": 0.5}')
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "latest").symlink_to("model.bin")
    (root / "empty" / "dir").mkdir(parents=True)
    return root


def saved(tmp_path: Path, run_id: str = "run-1") -> tuple[Cache, Manifest, Path]:
    out = make_outputs(tmp_path / "runs" / run_id / "train")
    cache = Cache(tmp_path / "runs" / "cache")
    ing = ingredients()
    manifest = cache.save(ing.key(), out, hash_tree(out), ing, run_id, "train")
    return cache, manifest, out


# ---- key and miss reasons ---------------------------------------------------------------------------------------


def test_key_ignores_dict_order_and_list_vs_tuple() -> None:
    a = ingredients(env={"A": "1", "B": "2"}, command=["python3", "/app/train.py"])
    b = ingredients(env={"B": "2", "A": "1"})
    assert a == b
    assert a.key() == b.key()
    assert a.version == KEY_VERSION


@pytest.mark.parametrize(
    "change",
    [
        {"image": IMAGE_B},
        {"command": ("python3", "/app/other.py")},
        {"entrypoint": ("/bin/sh",)},
        {"workdir": "/"},
        {"env": {"LOG_LEVEL": "debug"}},
        {"params": {"n_estimators": 300, "model": {"depth": 3, "kind": "gb"}}},
        {"inputs": {"data/raw.csv": RAW_B}},
        {"upstream": {"data": "e" * 64}},
        {"version": KEY_VERSION + 1},
    ],
)
def test_key_changes_with_every_ingredient(change: dict[str, object]) -> None:
    assert ingredients(**change).key() != ingredients().key()


def test_ingredients_json_round_trip() -> None:
    ing = ingredients()
    assert Ingredients.from_json(ing.to_json()) == ing
    assert Ingredients.from_json(ing.to_json()).key() == ing.key()


def test_ingredients_from_json_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        Ingredients.from_json("[1, 2]")
    with pytest.raises(ValueError):
        Ingredients.from_json("{not json")


def test_explain_miss_never_ran_and_identical() -> None:
    assert explain_miss(None, ingredients()) == ["never ran"]
    assert explain_miss(ingredients(), ingredients()) == []


def test_explain_miss_names_each_changed_ingredient() -> None:
    previous = ingredients()
    current = ingredients(
        image=IMAGE_B,
        command=("python3", "/app/other.py"),
        env={"LOG_LEVEL": "debug", "EXTRA": "1"},
        params={"n_estimators": 300, "model": {"depth": 3, "kind": "rf"}, "seed": 1},
        inputs={"data/raw.csv": RAW_B, "data/more.csv": RAW_A},
        upstream={"data": "e" * 64},
    )
    assert explain_miss(previous, current) == [
        "image rebuilt (sha256:1a2b3c4d5e6f -> sha256:9f8e7d6c5b4a)",
        "command changed",
        "env EXTRA added",
        "env LOG_LEVEL changed",
        'param model.kind "gb" -> "rf"',
        "param n_estimators 100 -> 300",
        "param seed added",
        "input data/more.csv added",
        "input data/raw.csv changed (1a2b3c4d.. -> 9f8e7d6c..)",
        "upstream data outputs changed",
    ]


def test_explain_miss_removed_ingredients() -> None:
    current = ingredients(env={}, params={"model": {"depth": 3, "kind": "gb"}}, inputs={}, upstream={})
    assert explain_miss(ingredients(), current) == [
        "env LOG_LEVEL removed",
        "param n_estimators removed",
        "input data/raw.csv removed",
        "upstream data removed",
    ]


def test_explain_miss_recipe_change_is_the_only_reason() -> None:
    old = Ingredients.from_json(ingredients(version=0, image="x").to_json())
    assert explain_miss(old, ingredients()) == [f"cache recipe changed (v0 -> v{KEY_VERSION})"]


# ---- save, lookup, restore -------------------------------------------------------------------------------------


def test_lookup_of_unknown_key_is_a_plain_miss(tmp_path: Path) -> None:
    lookup = Cache(tmp_path / "cache").lookup(ingredients().key())
    assert lookup.manifest is None and lookup.problem is None


def test_save_then_lookup_hits(tmp_path: Path) -> None:
    cache, manifest, out = saved(tmp_path)
    lookup = cache.lookup(manifest.key)
    assert lookup.problem is None
    assert lookup.manifest == manifest
    assert manifest.digest == hash_tree(out).digest
    assert manifest.empty_dirs == ("empty/dir",)
    assert {f.path: f.link for f in manifest.files}["latest"] == "model.bin"


def test_blobs_are_read_only_hard_links_of_the_outputs(tmp_path: Path) -> None:
    cache, manifest, out = saved(tmp_path)
    for entry in manifest.files:
        if entry.link is None:
            blob = cache.blob_path(entry)
            assert blob.stat().st_ino == (out / entry.path).stat().st_ino
            assert blob.stat().st_mode & 0o777 == (0o555 if entry.executable else 0o444)


def test_restore_round_trip_shares_inodes_with_blobs(tmp_path: Path) -> None:
    cache, manifest, out = saved(tmp_path)
    dest = tmp_path / "runs" / "run-2" / "train"
    cache.restore(manifest, dest)
    restored = hash_tree(dest)
    assert restored.digest == manifest.digest == hash_tree(out).digest
    assert (dest / "sub" / "metrics.json").read_text() == '{"r2": 0.5}'
    assert os.readlink(dest / "latest") == "model.bin"
    assert (dest / "empty" / "dir").is_dir()
    assert os.access(dest / "run.sh", os.X_OK)
    model = next(f for f in manifest.files if f.path == "model.bin")
    assert (dest / "model.bin").stat().st_ino == cache.blob_path(model).stat().st_ino


def test_save_dedupes_identical_content(tmp_path: Path) -> None:
    cache, first, _ = saved(tmp_path, "run-1")
    out2 = make_outputs(tmp_path / "runs" / "run-2" / "train")
    ing = ingredients(params={"n_estimators": 1})
    second = cache.save(ing.key(), out2, hash_tree(out2), ing, "run-2", "train")
    assert second.digest == first.digest
    model = next(f for f in second.files if f.path == "model.bin")
    blob = cache.blob_path(model)
    assert blob.stat().st_ino == (tmp_path / "runs" / "run-1" / "train" / "model.bin").stat().st_ino
    assert len(list((cache.root / "blobs").glob("*/*"))) == 3


def test_deleted_blob_is_a_miss_with_problem(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    model = next(f for f in manifest.files if f.path == "model.bin")
    cache.blob_path(model).unlink()
    lookup = cache.lookup(manifest.key)
    assert lookup.manifest is None
    assert lookup.problem == f"cache entry {manifest.key[:12]} is damaged (blob of model.bin is missing)"


def test_truncated_blob_is_a_miss_with_problem(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    metrics = next(f for f in manifest.files if f.path == "sub/metrics.json")
    blob = cache.blob_path(metrics)
    blob.chmod(0o644)
    blob.write_text("{")
    lookup = cache.lookup(manifest.key)
    assert lookup.manifest is None
    assert lookup.problem == (
        f"cache entry {manifest.key[:12]} is damaged (blob of sub/metrics.json has 1 bytes, not {metrics.size})"
    )


def test_unreadable_manifest_is_a_miss_with_problem(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    path = cache.root / "entries" / manifest.key[:2] / f"{manifest.key}.json"
    path.write_text('{"format": 1, "key": ')
    lookup = cache.lookup(manifest.key)
    assert lookup.manifest is None
    assert lookup.problem == f"cache entry {manifest.key[:12]} is damaged (unreadable manifest)"


def test_manifest_path_leaving_the_folder_is_damage(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    path = cache.root / "entries" / manifest.key[:2] / f"{manifest.key}.json"
    path.write_text(path.read_text().replace('"sub/metrics.json"', '"../../escape.json"'))
    lookup = cache.lookup(manifest.key)
    assert lookup.manifest is None
    assert lookup.problem == f"cache entry {manifest.key[:12]} is damaged (a path leaves the outputs folder)"


def test_resave_repairs_a_damaged_entry(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    model = next(f for f in manifest.files if f.path == "model.bin")
    cache.blob_path(model).unlink()
    rerun = make_outputs(tmp_path / "runs" / "run-2" / "train")
    cache.save(manifest.key, rerun, hash_tree(rerun), manifest.ingredients, "run-2", "train")
    lookup = cache.lookup(manifest.key)
    assert lookup.problem is None and lookup.manifest is not None
    assert lookup.manifest.run_id == "run-2"


def test_interrupted_save_leaves_no_entry(tmp_path: Path) -> None:
    """A crash between writing the manifest's temporary file and the rename: that file is not an entry."""
    cache = Cache(tmp_path / "cache")
    out = make_outputs(tmp_path / "out")
    ing = ingredients()
    full = Cache(tmp_path / "other").save(ing.key(), out, hash_tree(out), ing, "run-1", "train")
    entry_dir = cache.root / "entries" / ing.key()[:2]
    entry_dir.mkdir(parents=True)
    (entry_dir / f".{ing.key()}.json.1234abcd.tmp").write_text(full.to_json()[:50])
    assert cache.lookup(ing.key()).manifest is None
    assert cache.lookup(ing.key()).problem is None
    assert list(cache.entries()) == []


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    cache, _, _ = saved(tmp_path)
    assert [p for p in cache.root.rglob(".*")] == []


def test_manifest_json_round_trip(tmp_path: Path) -> None:
    _, manifest, _ = saved(tmp_path)
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_manifest_of_unknown_format_is_refused(tmp_path: Path) -> None:
    _, manifest, _ = saved(tmp_path)
    with pytest.raises(ValueError, match="format"):
        Manifest.from_json(manifest.to_json().replace('"format": 1', '"format": 99'))


def test_restore_copies_when_a_link_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, manifest, _ = saved(tmp_path)

    def cross_device(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")  # EXDEV: the run folder is on another filesystem

    monkeypatch.setattr(os, "link", cross_device)
    dest = tmp_path / "elsewhere"
    cache.restore(manifest, dest)
    assert hash_tree(dest).digest == manifest.digest
    model = next(f for f in manifest.files if f.path == "model.bin")
    assert (dest / "model.bin").stat().st_ino != cache.blob_path(model).stat().st_ino
    assert (dest / "model.bin").stat().st_mode & 0o777 == 0o444


# ---- entries, verify, gc -------------------------------------------------------------------------------------


def test_entries_lists_saved_manifests(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    assert list(cache.entries()) == [manifest]


def test_verify_clean_cache_has_no_problems(tmp_path: Path) -> None:
    cache, _, _ = saved(tmp_path)
    report = cache.verify()
    assert report.problems == ()
    assert (report.blobs_checked, report.entries_checked) == (3, 1)
    assert report.bytes_checked == sum(f.size for f in next(cache.entries()).files)


def overwrite_in_place(path: Path, data: bytes) -> None:
    """What root editing a restored (hard-linked) file does: same inode, same size, new bytes."""
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(data)


def test_same_size_write_in_place_is_a_miss_at_lookup(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    model = next(f for f in manifest.files if f.path == "model.bin")
    assert manifest.sealed
    overwrite_in_place(cache.blob_path(model), b"X" * model.size)
    lookup = cache.lookup(manifest.key)
    assert lookup.manifest is None
    assert lookup.problem == (f"cache entry {manifest.key[:12]} is damaged (blob of model.bin was modified after "
                              "it was saved; `pipe cache verify` checks it)")


def test_restored_file_written_as_root_is_caught_at_the_next_lookup(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    dest = tmp_path / "runs" / "run-2" / "train"
    cache.restore(manifest, dest)
    overwrite_in_place(dest / "sub" / "metrics.json", b'{"r2": 0.9}')  # a hard link here: the blob changes too
    assert cache.lookup(manifest.key).problem is not None


def test_verify_finds_same_size_corruption_and_repair_turns_the_entry_into_a_plain_miss(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    model = next(f for f in manifest.files if f.path == "model.bin")
    overwrite_in_place(cache.blob_path(model), b"X" * model.size)
    report = cache.verify()
    assert [p.kind for p in report.problems] == ["corrupt_blob", "damaged_blob"]
    assert report.problems[0].message.startswith(f"blob {model.digest[:12]} is corrupt")
    assert report.problems[1].message == \
        f"cache entry {manifest.key[:12]} is damaged (blob of model.bin is missing or corrupt)"
    assert report.problems[1].key == manifest.key
    assert cache.blob_path(model).exists(), "verify without --repair changes nothing"

    repaired = cache.verify(repair=True)
    assert (repaired.blobs_removed, repaired.entries_removed) == (1, 1)
    assert not cache.blob_path(model).exists()
    assert cache.lookup(manifest.key) == Lookup(None)  # a plain miss: the stage re-runs and saves it again
    assert cache.verify().problems == ()


def test_touched_blob_misses_and_repair_seals_it_again(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    model = next(f for f in manifest.files if f.path == "model.bin")
    os.utime(cache.blob_path(model))  # content intact, modification time moved
    assert cache.lookup(manifest.key).manifest is None
    report = cache.verify(repair=True)
    assert [p.kind for p in report.problems] == ["moved_tag"]
    assert (report.blobs_resealed, report.entries_removed) == (1, 0)
    assert cache.lookup(manifest.key).manifest == manifest


def test_save_replaces_a_blob_written_in_place_instead_of_reusing_it(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path, "run-1")
    model = next(f for f in manifest.files if f.path == "model.bin")
    overwrite_in_place(cache.blob_path(model), b"X" * model.size)
    rerun = make_outputs(tmp_path / "runs" / "run-2" / "train")
    cache.save(manifest.key, rerun, hash_tree(rerun), manifest.ingredients, "run-2", "train")
    assert cache.blob_path(model).read_bytes() == b"weights" * 100
    assert cache.lookup(manifest.key).manifest is not None
    assert cache.verify().problems == ()


def test_entries_of_an_older_pipe_are_checked_by_size_only(tmp_path: Path) -> None:
    """Manifests written before blobs were sealed have no `sealed`: upgrading must not turn them into misses."""
    cache, manifest, _ = saved(tmp_path)
    path = cache.root / "entries" / manifest.key[:2] / f"{manifest.key}.json"
    path.write_text(path.read_text().replace(', "sealed": true', ""))
    model = next(f for f in manifest.files if f.path == "model.bin")
    os.utime(cache.blob_path(model), ns=(0, 5))  # an unsealed blob, as an older pipe stored it
    assert cache.lookup(manifest.key).manifest == replace(manifest, sealed=False)
    assert cache.verify().problems == ()
    rerun = make_outputs(tmp_path / "runs" / "run-2" / "train")
    ing = ingredients(params={"n_estimators": 2})
    again = cache.save(ing.key(), rerun, hash_tree(rerun), ing, "run-2", "train")
    assert again.sealed, "the unsealed blob was replaced by the fresh file, sealed"


def test_lookup_stays_one_stat_per_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, manifest, _ = saved(tmp_path)
    stats: list[Path] = []
    real = Path.stat

    def counting(self: Path, **kwargs: bool) -> os.stat_result:
        stats.append(self)
        return real(self, **kwargs)

    monkeypatch.setattr(Path, "stat", counting)
    assert cache.lookup(manifest.key).manifest is not None
    assert len(stats) == sum(1 for f in manifest.files if f.link is None)


def test_gc_removes_unkept_entries_and_keeps_referenced_blobs(tmp_path: Path) -> None:
    cache, kept, _ = saved(tmp_path, "run-1")
    out2 = tmp_path / "runs" / "run-2" / "train"
    out2.mkdir(parents=True)
    (out2 / "model.bin").write_bytes(b"weights" * 100)  # shared with the kept entry
    (out2 / "other.bin").write_bytes(b"only here")
    ing = ingredients(params={"n_estimators": 7})
    dropped = cache.save(ing.key(), out2, hash_tree(out2), ing, "run-2", "train")

    preview = cache.gc({kept.key}, dry_run=True)
    assert (preview.entries_removed, preview.entries_kept, preview.blobs_removed) == (1, 1, 1)
    assert preview.blob_bytes == len(b"only here")
    manifest_file = cache.root / "entries" / dropped.key[:2] / f"{dropped.key}.json"
    other = (out2 / "other.bin").stat()
    assert (preview.bytes_freed, preview.bytes_still_linked) == \
        (manifest_file.stat().st_blocks * 512, other.st_blocks * 512), "run-2 still links other.bin's blob"
    assert preview.removed_keys == (dropped.key,)
    assert cache.lookup(dropped.key).manifest is not None  # dry run removed nothing

    report = cache.gc({kept.key})
    assert report == preview
    assert cache.lookup(dropped.key).manifest is None
    assert cache.lookup(kept.key).manifest is not None
    assert cache.verify().problems == ()


def test_gc_with_nothing_kept_empties_the_cache(tmp_path: Path) -> None:
    cache, _, _ = saved(tmp_path)
    report = cache.gc(set())
    assert (report.entries_removed, report.blobs_removed) == (1, 3)
    assert list((cache.root / "blobs").glob("*/*")) == []


def blocks(paths: list[Path]) -> int:
    return sum(p.lstat().st_blocks * 512 for p in paths)


def test_gc_reports_only_what_the_disk_gets_back(tmp_path: Path) -> None:
    """Issue 14 #16: gc said "5.4 MiB" while every blob stayed hard-linked from a run folder."""
    cache, _, out = saved(tmp_path)
    files = [p for p in cache.root.rglob("*") if p.is_file()]
    report = cache.gc(set(), dry_run=True)
    assert report.blob_bytes == (b"weights" * 100).__len__() + len('{"r2": 0.5}') + len("#!/bin/sh\n")
    manifests = [p for p in files if p.suffix == ".json"]
    assert report.bytes_freed == blocks(manifests), "the blobs stay: the run folder links every one"
    assert report.bytes_still_linked == blocks([p for p in files if p not in manifests])

    everything = blocks(files)
    runner_remove(out)  # the run folder goes: now the blobs' last links go with the cache
    assert cache.gc(set()).bytes_freed == everything


def runner_remove(out: Path) -> None:
    for path in sorted(out.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    out.rmdir()


def test_gc_removes_stale_temporary_files_only(tmp_path: Path) -> None:
    cache, manifest, _ = saved(tmp_path)
    entry_dir = cache.root / "entries" / manifest.key[:2]
    fresh = entry_dir / ".fresh.json.1.tmp"
    fresh.write_text("{")
    cache.gc({manifest.key})
    assert fresh.exists()  # a save in progress may own it


def test_gc_removes_temporary_files_older_than_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, manifest, _ = saved(tmp_path)
    stale = cache.root / "entries" / manifest.key[:2] / ".crashed.json.1.tmp"
    stale.write_text("{")
    monkeypatch.setattr("orchestrator.cache.STALE_TMP_S", -1)
    cache.gc({manifest.key}, dry_run=True)
    assert stale.exists()
    cache.gc({manifest.key})
    assert not stale.exists()
    assert cache.lookup(manifest.key).manifest is not None


# ---- reflinks and their fallback ------------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY])
def test_restore_falls_back_to_hard_links_where_reflinks_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    cache, manifest, _ = saved(tmp_path)
    asked: list[int] = []

    def refuse(fd: int, request: int, arg: int) -> None:
        asked.append(request)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    restorer = Cache(cache.root)
    dest = tmp_path / "runs" / "run-2" / "train"
    restorer.restore(manifest, dest)
    assert asked == [FICLONE], "asked once, then no more for this cache"
    assert hash_tree(dest).digest == manifest.digest
    for entry in manifest.files:
        if entry.link is None:
            assert (dest / entry.path).stat().st_ino == cache.blob_path(entry).stat().st_ino
    assert [p.name for p in dest.rglob(".*")] == [], "a refused clone leaves no file behind"


def test_a_clone_failing_otherwise_is_an_error_naming_the_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, manifest, _ = saved(tmp_path)

    def broken(fd: int, request: int, arg: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "ioctl", broken)
    with pytest.raises(PipeError, match=f"cannot restore cache entry {manifest.key[:12]} of train"):
        Cache(cache.root).restore(manifest, tmp_path / "dest")


def test_clone_on_this_file_system_or_a_clean_refusal(tmp_path: Path) -> None:
    """Unpatched: tmp_path's own file system either clones (a new inode, same bytes) or refuses leaving nothing."""
    (tmp_path / "a").write_bytes(b"abc" * 1000)
    if clone(tmp_path / "a", tmp_path / "b", 0o444):
        assert (tmp_path / "b").read_bytes() == b"abc" * 1000
        assert (tmp_path / "b").stat().st_ino != (tmp_path / "a").stat().st_ino
        assert (tmp_path / "b").stat().st_mode & 0o777 == 0o444
    else:
        assert not (tmp_path / "b").exists()
