"""rl_service.infra.atomic: writes either complete or leave the previous file and no temp files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import pytest

from rl_service.infra.atomic import atomic_write_bytes, atomic_write_json, atomic_write_with, atomic_writer


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
