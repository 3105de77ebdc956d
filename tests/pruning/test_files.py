"""pruning.files: a write lands whole or not at all, leaves no temporary behind, and gets open()'s mode."""

import os

import pytest

from pruning.files import replacing, replacing_directory, write_atomic


def plain_mode(kind: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return kind & ~umask


def test_text_and_bytes_replace_the_file_with_a_plain_mode(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "first ≈")
    assert path.read_text(encoding="utf-8") == "first ≈"
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert path.stat().st_mode & 0o777 == plain_mode(0o666)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_directory_replaces_a_directory_or_a_file_and_a_failure_leaves_it(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with replacing_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert out.stat().st_mode & 0o777 == plain_mode(0o777)
    with pytest.raises(RuntimeError), replacing_directory(out) as tmp:
        (tmp / "half").write_text("")
        raise RuntimeError
    assert [p.name for p in out.iterdir()] == ["config.json"]
    file = tmp_path / "was-a-file"
    file.write_text("x")
    with replacing_directory(file) as tmp:
        (tmp / "b").write_text("y")
    assert (file / "b").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "was-a-file"]
