"""Writes are confined to their root at write time: a directory swapped for a symlink after a request was
checked fails the write (PathEscapesRoot) and nothing lands where the link points, for every write path of runs
(final model, checkpoints, replay buffers, metadata and history json) and of named policies."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

import pytest
import torch

from rl_service.infra.atomic import PathEscapesRoot, atomic_write_bytes, atomic_writer
from rl_service.infra.model_store import FileModelStore
from rl_service.infra.policy_store import FilePolicyStore


class FakeModel:
    """Saves a few bytes as a model and as a replay buffer."""

    def save(self, file: IO[bytes]) -> None:
        file.write(b"model")

    def save_replay_buffer(self, file: IO[bytes]) -> None:
        file.write(b"buffer")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


def _swap_for_link(directory: Path, target: Path) -> None:
    """What an attacker with a shell on the host does between the check and the write."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.is_dir():
        directory.rename(directory.with_name(directory.name + ".moved"))
    directory.symlink_to(target, target_is_directory=True)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------ the primitive


def test_a_confined_write_creates_its_directories(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "root" / "a" / "b" / "f.bin", b"x", root=tmp_path / "root")
    assert (tmp_path / "root" / "a" / "b" / "f.bin").read_bytes() == b"x"
    assert _leftovers(tmp_path / "root") == ["a/b/f.bin"]


@pytest.mark.parametrize("depth", [0, 1])
def test_a_symlinked_directory_fails_the_write(tmp_path: Path, outside: Path, depth: int) -> None:
    root = tmp_path / "root"
    linked = root / "a" if depth == 0 else root / "a" / "b"
    _swap_for_link(linked, outside)
    with pytest.raises(PathEscapesRoot, match="symlink"):
        atomic_write_bytes(root / "a" / "b" / "f.bin", b"x", root=root)
    assert list(outside.iterdir()) == []


def test_a_link_to_a_directory_inside_the_root_is_refused_too(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    with pytest.raises(PathEscapesRoot):
        atomic_write_bytes(root / "alias" / "f.bin", b"x", root=root)


def test_a_file_where_a_directory_should_be_fails_the_write(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"")
    with pytest.raises(PathEscapesRoot):
        atomic_write_bytes(root / "a" / "f.bin", b"x", root=root)


def test_a_symlink_at_the_file_name_is_replaced_not_followed(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (outside / "victim").write_bytes(b"keep")
    (root / "f.bin").symlink_to(outside / "victim")
    atomic_write_bytes(root / "f.bin", b"new", root=root)
    assert (outside / "victim").read_bytes() == b"keep"
    assert not (root / "f.bin").is_symlink() and (root / "f.bin").read_bytes() == b"new"


@pytest.mark.parametrize("relative", ["../escape.bin", "a/../../escape.bin"])
def test_paths_that_leave_the_root_lexically_are_refused(tmp_path: Path, relative: str) -> None:
    root = tmp_path / "root"
    with pytest.raises(PathEscapesRoot):
        atomic_write_bytes(root / relative, b"x", root=root)
    assert not (tmp_path / "escape.bin").exists()


def test_a_failed_confined_write_leaves_no_temp_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(RuntimeError), atomic_writer(root / "d" / "f.bin", root=root) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    assert list((root / "d").iterdir()) == []


def test_the_root_itself_may_be_a_link(tmp_path: Path) -> None:
    # The operator's configured root is trusted as given; only what lies below it is held to no links.
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "configured").symlink_to(real, target_is_directory=True)
    atomic_write_bytes(real / "f.bin", b"x", root=tmp_path / "configured")
    assert (real / "f.bin").read_bytes() == b"x"


# ------------------------------------------------------------------ runs


@pytest.fixture
def store(tmp_path: Path) -> FileModelStore:
    return FileModelStore(tmp_path / "models", tmp_path / "checkpoints", keep_checkpoints=3)


def test_the_final_model_is_not_written_through_a_swapped_directory(store: FileModelStore, outside: Path) -> None:
    path = store.resolve_model_path("run-1", "cartpole/ppo.zip")  # accepted: cartpole/ does not exist yet
    _swap_for_link(path.parent, outside)
    with pytest.raises(PathEscapesRoot):
        store.save_model(FakeModel(), path)
    assert list(outside.iterdir()) == []


def test_checkpoints_and_replay_buffers_are_not_written_through_a_swapped_run_directory(
        store: FileModelStore, outside: Path) -> None:
    store.save_checkpoint("run-1", FakeModel(), 100, replay_buffer=True)
    _swap_for_link(store.checkpoint_run_dir("run-1"), outside)
    with pytest.raises(PathEscapesRoot):
        store.save_checkpoint("run-1", FakeModel(), 200, replay_buffer=True)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("name", ["metadata.json", "history.json"])
def test_run_json_is_not_written_through_a_swapped_run_directory(store: FileModelStore, outside: Path,
                                                                 name: str) -> None:
    _swap_for_link(store.run_dir("run-1"), outside)
    with pytest.raises(PathEscapesRoot):
        store.write_json(store.run_dir("run-1") / name, {"run_id": "run-1"})
    assert list(outside.iterdir()) == []


def test_record_attempts_does_not_follow_a_swapped_run_directory(store: FileModelStore, outside: Path) -> None:
    (outside / "metadata.json").write_text(json.dumps({"run_id": "victim"}))
    _swap_for_link(store.run_dir("run-1"), outside)
    with pytest.raises(PathEscapesRoot):
        store.record_attempts("run-1", [{"attempt": 1}])
    assert json.loads((outside / "metadata.json").read_text()) == {"run_id": "victim"}


def test_a_path_outside_both_roots_is_refused_by_the_store(store: FileModelStore, outside: Path) -> None:
    with pytest.raises(PathEscapesRoot):
        store.save_model(FakeModel(), outside / "model.zip")
    assert list(outside.iterdir()) == []


def test_checkpoint_dir_inside_models_dir_uses_the_innermost_root(tmp_path: Path) -> None:
    nested = FileModelStore(tmp_path / "models", tmp_path / "models" / "ckpt")
    path = nested.save_checkpoint("run-1", FakeModel(), 100)
    assert path.read_bytes() == b"model" and path.parent == (tmp_path / "models" / "ckpt" / "run-1").resolve()


# ------------------------------------------------------------------ named policies


def _tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2)}


def test_a_policy_state_is_not_written_through_a_swapped_directory(tmp_path: Path, outside: Path) -> None:
    store = FilePolicyStore(tmp_path / "policies")
    store.save_state("p", _tensors(), {"version": "1"})
    _swap_for_link(tmp_path / "policies" / "p", outside)
    with pytest.raises(PathEscapesRoot):
        store.save_state("p", _tensors(), {"version": "2"})
    assert list(outside.iterdir()) == []


def test_a_policy_checkpoint_is_not_written_through_a_swapped_directory(tmp_path: Path, outside: Path) -> None:
    store = FilePolicyStore(tmp_path / "policies")
    store.save_state("p", _tensors(), {"version": "1"})
    _swap_for_link(tmp_path / "policies" / "p" / "checkpoints", outside)
    with pytest.raises(PathEscapesRoot):
        store.save_checkpoint("p", "c1", _tensors(), {"version": "1"})
    assert list(outside.iterdir()) == []


def test_a_policy_checkpoint_swapped_between_check_and_write_is_refused(tmp_path: Path, outside: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The store's own name check passes (the directory is real then); the link appears just before the write.
    store = FilePolicyStore(tmp_path / "policies")
    store.save_state("p", _tensors(), {"version": "1"})
    real_write = atomic_write_bytes

    def swap_then_write(path: Path, data: bytes, root: Path | None = None) -> None:
        _swap_for_link(tmp_path / "policies" / "p", outside)
        real_write(path, data, root)

    monkeypatch.setattr("rl_service.infra.policy_store.atomic_write_bytes", swap_then_write)
    with pytest.raises(PathEscapesRoot):
        store.save_checkpoint("p", "c1", _tensors(), {"version": "1"})
    assert list(outside.iterdir()) == []
    assert os.path.islink(tmp_path / "policies" / "p")
