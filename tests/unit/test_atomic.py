"""rl_service.infra.atomic: writes either complete or leave the previous file and no temp files; the temp files a
killed writer leaves are recognised and removed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

import pytest

from rl_service.infra.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    atomic_writer,
    is_temp_file_name,
    remove_temp_files,
)


class Boom(Exception):
    pass


def test_write_bytes_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_write_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_write_json_is_sorted_and_indented(tmp_path: Path) -> None:
    target = tmp_path / "d.json"
    atomic_write_json(target, {"z": 1, "a": {"k": [1, 2]}, "u": "é"})
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == {"z": 1, "a": {"k": [1, 2]}, "u": "é"}
    assert text.index('"a"') < text.index('"z"')
    assert "\n  " in text


def test_raise_midway_keeps_original_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "model.zip"
    target.write_bytes(b"original")

    def half_write(handle: IO[bytes]) -> None:
        handle.write(b"partial data")
        handle.flush()
        raise Boom("midway")

    with pytest.raises(Boom):
        atomic_write_with(target, half_write)
    assert target.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["model.zip"]


def test_raise_midway_without_original_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.zip"
    with pytest.raises(Boom), atomic_writer(target) as handle:
        handle.write(b"x" * 10_000)
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_base_exception_also_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"keep")
    with pytest.raises(KeyboardInterrupt), atomic_writer(target) as handle:
        handle.write(b"y")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"keep"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_unserialisable_json_keeps_original(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    target.write_text('{"ok": true}')
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_temp_file_lives_beside_target_until_publish(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    with atomic_writer(target) as handle:
        handle.write(b"abc")
        entries = [p.name for p in tmp_path.iterdir()]
        assert not target.exists()
        assert len(entries) == 1
        assert entries[0].startswith(".f.bin.")
        assert entries[0].endswith(".tmp")
    assert target.read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_temp_file_names_are_recognised_exactly(tmp_path: Path) -> None:
    with atomic_writer(tmp_path / "state.safetensors"):
        (temp,) = tmp_path.iterdir()
    assert is_temp_file_name(temp.name)
    assert is_temp_file_name(".checkpoint_500_steps.zip.k2j_h4g5.tmp")
    for other in ("notes.tmp", ".x.tmp", ".x.abcdefg.tmp", ".x.ABCDEFGH.tmp", ".x.abcdefghi.tmp", "x.abcdefgh.tmp",
                  ".x.abcdefgh.tmp.bak", ".x.abcdefgh.temp"):
        assert not is_temp_file_name(other), other


def test_remove_temp_files_clears_only_ours_below_the_roots(tmp_path: Path) -> None:
    data, models, elsewhere = tmp_path / "data", tmp_path / "models", tmp_path / "elsewhere"
    ours = [data / ".runs.json.abcd1234.tmp", data / "models" / "run-1" / ".model.zip.a_b_c_d_.tmp",
            models / "run-2" / ".history.json.zz99zz99.tmp"]
    kept = [data / "notes.tmp", data / "model.zip", data / ".x.abc.tmp", elsewhere / ".model.zip.abcd1234.tmp",
            data / ".dir.abcd1234.tmp" / "inside"]
    for path in ours + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (data / "link").symlink_to(elsewhere)  # not followed out of the data directories
    (data / ".linked.abcd1234.tmp").symlink_to(elsewhere / ".model.zip.abcd1234.tmp")  # not a regular file
    # Nested and repeated roots, and one that does not exist, count each file once.
    assert remove_temp_files(data, data / "models", models, models, tmp_path / "missing") == 3
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in kept)
    assert os.path.islink(data / ".linked.abcd1234.tmp")
