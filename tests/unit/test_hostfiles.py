"""hostfiles: secrets as private files on a tmpfs, removed after; the owner they are given; the capped log."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from orchestrator import hostfiles
from orchestrator.executor import SecretFile
from orchestrator.hostfiles import CappedLog, parse_owner, secrets_dir


def test_parse_owner() -> None:
    assert parse_owner("1000:1000") == (1000, 1000)
    assert parse_owner("1000") == (1000, 0)
    assert parse_owner("") == (0, 0)
    assert parse_owner("root") == (0, 0)
    assert parse_owner("app") is None
    assert parse_owner("1000:staff") is None


def test_log_is_capped_with_a_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfiles, "LOG_CAP_BYTES", 100)
    path = tmp_path / "logs" / "train.log"
    with CappedLog(path) as log:
        for i in range(50):
            log.write(f"line {i}")
    lines = path.read_text().splitlines()
    assert lines[-1] == "[pipe: log truncated after 100 B]"
    assert lines[:-1] == [f"line {i}" for i in range(len(lines) - 1)]
    assert sum(len(line) + 1 for line in lines[:-1]) <= 100


def testsecrets_dir_is_private_and_removed() -> None:
    me = (os.getuid(), os.getgid())
    with secrets_dir((SecretFile("API_TOKEN", "v1"), SecretFile("DB", "v2")), me) as inner:
        assert inner is not None
        outer = inner.parent
        assert stat.S_IMODE(outer.stat().st_mode) == 0o700
        assert (inner / "API_TOKEN").read_text() == "v1"
        assert stat.S_IMODE((inner / "DB").stat().st_mode) == 0o400
        assert (inner / "DB").stat().st_uid == me[0]
    assert not outer.exists()


def testsecrets_dir_is_removed_when_writing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    real_mkdtemp = hostfiles.tempfile.mkdtemp

    def recording_mkdtemp(**kwargs: str) -> str:
        made.append(Path(real_mkdtemp(**kwargs)))
        return str(made[-1])

    monkeypatch.setattr(hostfiles.tempfile, "mkdtemp", recording_mkdtemp)
    secrets = (SecretFile("OK", "v"), SecretFile("../escape", "v"))
    with pytest.raises(ValueError, match="unsafe secret name"), secrets_dir(secrets, (0, 0)):
        pass
    assert len(made) == 1
    assert not made[0].exists()


def test_no_secrets_means_no_folder() -> None:
    with secrets_dir((), None) as inner:
        assert inner is None


def test_the_stage_log_sink_redacts_a_secret_split_across_chunks_and_cuts_long_lines(tmp_path: Path) -> None:
    from orchestrator.hostfiles import LINE_CAP_BYTES, CappedLog, StageLogSink

    seen: list[str] = []
    tail: list[str] = []
    secret = b"hunter2-the-token"
    with CappedLog(tmp_path / "s.log") as log:
        sink = StageLogSink(log, [secret], seen.append, tail, streams=2)
        for chunk in (b"first line\nthe key is hun", b"ter2-the-", b"token, ok\nno newline"):
            sink.feed(chunk)
        sink.feed(b"err", stream=1)
        long = b"x" * (LINE_CAP_BYTES - 3) + secret + b"y" * 10  # the secret straddles the cap
        sink.feed(long[:LINE_CAP_BYTES])
        sink.feed(long[LINE_CAP_BYTES:])
        sink.close()
    assert seen[:2] == ["first line", "the key is ***, ok"]
    assert tail == seen and "hunter2" not in "".join(seen)
    assert seen[-1] == "err"  # stderr's partial line, kept apart from stdout's
    assert all(len(line) <= LINE_CAP_BYTES + len(secret) for line in seen)
    assert "hunter2" not in (tmp_path / "s.log").read_text()
    assert "".join(seen[2:]).replace("err", "") == "no newline" + "x" * (LINE_CAP_BYTES - 3) + "***" + "y" * 10
