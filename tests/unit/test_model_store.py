"""rl_service.infra.model_store.FileModelStore: path confinement, no overwrites, checkpoints and pruning."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import IO, Any

import pytest

from rl_service.core.errors import AlreadyExists, InvalidRequest, PathOutsideRoot
from rl_service.infra.model_store import MAX_PATH_LENGTH, FileModelStore


class FakeModel:
    """Stands in for a stable-baselines3 model: save(file) writes a few bytes."""

    def __init__(self, payload: bytes = b"model-bytes") -> None:
        self.payload = payload
        self.saves = 0

    def save(self, file: IO[bytes]) -> None:
        self.saves += 1
        file.write(self.payload)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    models = tmp_path / "data" / "models"
    checkpoints = tmp_path / "data" / "checkpoints"
    models.mkdir(parents=True)
    return models, checkpoints


@pytest.fixture
def store(roots: tuple[Path, Path]) -> FileModelStore:
    return FileModelStore(roots[0], roots[1], keep_checkpoints=3)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------ resolve_model_path


def test_default_model_path(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    path = store.resolve_model_path("run-abc", "")
    assert path == roots[0].resolve() / "run-abc" / "model.zip"
    assert store.run_dir("run-abc") == roots[0].resolve() / "run-abc"
    assert store.checkpoint_run_dir("run-abc") == roots[1].resolve() / "run-abc"
    assert not path.parent.exists()


@pytest.mark.parametrize(("requested", "relative"), [
    ("cartpole/ppo.zip", "cartpole/ppo.zip"),
    ("cartpole/ppo", "cartpole/ppo.zip"),
    ("model", "model.zip"),
    ("a/b/../c.zip", "a/c.zip"),
    ("./x.zip", "x.zip"),
])
def test_relative_path_inside_models_dir(
    store: FileModelStore, roots: tuple[Path, Path], requested: str, relative: str
) -> None:
    before = _tree(roots[0])
    path = store.resolve_model_path("run-1", requested)
    assert path == roots[0].resolve() / relative
    assert path.suffix == ".zip"
    assert _tree(roots[0]) == before  # nothing created


def test_absolute_path_inside_models_dir_accepted(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    requested = str(roots[0].resolve() / "abs" / "m.zip")
    assert store.resolve_model_path("run-1", requested) == Path(requested)


@pytest.mark.parametrize("requested", [
    "../x.zip", "../../x.zip", "a/../../x.zip", "..", ".", "/tmp/x.zip", "/etc/passwd",
])
def test_paths_outside_models_dir_refused(
    store: FileModelStore, roots: tuple[Path, Path], tmp_path: Path, requested: str
) -> None:
    before = _tree(tmp_path)
    with pytest.raises(PathOutsideRoot) as info:
        store.resolve_model_path("run-1", requested)
    assert info.value.field == "model_output_path"
    assert repr(requested) in info.value.message
    assert _tree(tmp_path) == before


def test_absolute_path_elsewhere_refused(store: FileModelStore, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "model.zip"
    with pytest.raises(PathOutsideRoot) as info:
        store.resolve_model_path("run-1", str(target))
    assert info.value.field == "model_output_path"
    assert not target.parent.exists()


def test_sibling_directory_with_common_prefix_refused(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    # "models_evil" starts with "models" as a string but is not inside it.
    sibling = roots[0].resolve().parent / (roots[0].name + "_evil")
    with pytest.raises(PathOutsideRoot):
        store.resolve_model_path("run-1", str(sibling / "x.zip"))
    with pytest.raises(PathOutsideRoot):
        store.resolve_model_path("run-1", f"../{roots[0].name}_evil/x.zip")
    assert not sibling.exists()


def test_symlinked_directory_pointing_outside_refused(
    store: FileModelStore, roots: tuple[Path, Path], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (roots[0] / "escape").symlink_to(outside, target_is_directory=True)
    for requested in ("escape/x.zip", "escape/x", "escape/sub/x.zip"):
        with pytest.raises(PathOutsideRoot) as info:
            store.resolve_model_path("run-1", requested)
        assert info.value.field == "model_output_path"
    assert list(outside.iterdir()) == []


def test_symlinked_file_pointing_outside_refused(
    store: FileModelStore, roots: tuple[Path, Path], tmp_path: Path
) -> None:
    target = tmp_path / "victim.zip"
    target.write_bytes(b"precious")
    (roots[0] / "link.zip").symlink_to(target)
    with pytest.raises(PathOutsideRoot):
        store.resolve_model_path("run-1", "link.zip")
    assert target.read_bytes() == b"precious"


def test_symlink_inside_models_dir_pointing_inside_is_fine(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    (roots[0] / "real").mkdir()
    (roots[0] / "alias").symlink_to(roots[0] / "real", target_is_directory=True)
    assert store.resolve_model_path("run-1", "alias/m.zip") == roots[0].resolve() / "real" / "m.zip"


def test_existing_file_gives_already_exists(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    (roots[0] / "taken.zip").write_bytes(b"old")
    for requested in ("taken.zip", "taken"):
        with pytest.raises(AlreadyExists) as info:
            store.resolve_model_path("run-1", requested)
        assert info.value.field == "model_output_path"
        assert "taken.zip" in info.value.message
    assert (roots[0] / "taken.zip").read_bytes() == b"old"


@pytest.mark.parametrize("requested", ["a\x00b.zip", "x" * (MAX_PATH_LENGTH + 1)])
def test_nul_and_overlong_paths_refused(store: FileModelStore, requested: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        store.resolve_model_path("run-1", requested)
    assert info.value.field == "model_output_path"


# ------------------------------------------------------------------ saving


def test_save_model_writes_atomically_creating_parents(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    path = store.resolve_model_path("run-1", "deep/er/m.zip")
    store.save_model(FakeModel(b"abc"), path)
    assert path.read_bytes() == b"abc"
    assert sorted(os.listdir(path.parent)) == ["m.zip"]


def test_save_model_failure_leaves_nothing(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    class Broken:
        def save(self, file: IO[bytes]) -> None:
            file.write(b"half")
            raise OSError("disk full")

    path = roots[0] / "run-1" / "model.zip"
    with pytest.raises(OSError, match="disk full"):
        store.save_model(Broken(), path)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_write_json(store: FileModelStore) -> None:
    path = store.run_dir("run-1") / "metadata.json"
    store.write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}


# ------------------------------------------------------------------ checkpoints


def test_save_checkpoint_names_and_returns_path(store: FileModelStore, roots: tuple[Path, Path]) -> None:
    path = store.save_checkpoint("run-1", FakeModel(b"ck"), 1234)
    assert path == roots[1].resolve() / "run-1" / "checkpoint_1234_steps.zip"
    assert path.read_bytes() == b"ck"
    assert store.checkpoints("run-1") == [path]
    assert store.latest_checkpoint("run-1") == path


def test_pruning_keeps_newest(store: FileModelStore) -> None:
    model = FakeModel()
    for steps in (100, 200, 300, 400, 500, 600):
        store.save_checkpoint("run-1", model, steps)
    names = [p.name for p in store.checkpoints("run-1")]
    assert names == ["checkpoint_400_steps.zip", "checkpoint_500_steps.zip", "checkpoint_600_steps.zip"]
    assert sorted(os.listdir(store.checkpoint_run_dir("run-1"))) == sorted(names)
    assert model.saves == 6


def test_pruning_is_numeric_not_lexicographic(roots: tuple[Path, Path]) -> None:
    store = FileModelStore(roots[0], roots[1], keep_checkpoints=2)
    for steps in (900, 1000, 9000, 10000):
        store.save_checkpoint("run-1", FakeModel(), steps)
    assert [p.name for p in store.checkpoints("run-1")] == [
        "checkpoint_9000_steps.zip", "checkpoint_10000_steps.zip",
    ]


def test_pruning_is_per_run(roots: tuple[Path, Path]) -> None:
    store = FileModelStore(roots[0], roots[1], keep_checkpoints=1)
    store.save_checkpoint("run-a", FakeModel(), 10)
    store.save_checkpoint("run-b", FakeModel(), 20)
    store.save_checkpoint("run-a", FakeModel(), 30)
    assert [p.name for p in store.checkpoints("run-a")] == ["checkpoint_30_steps.zip"]
    assert [p.name for p in store.checkpoints("run-b")] == ["checkpoint_20_steps.zip"]


def test_latest_checkpoint_ordering_is_numeric(store: FileModelStore) -> None:
    directory = store.checkpoint_run_dir("run-1")
    directory.mkdir(parents=True)
    for name in ("checkpoint_1000_steps.zip", "checkpoint_900_steps.zip", "checkpoint_50_steps.zip",
                 "notes.txt", "checkpoint_x_steps.zip", ".checkpoint_99999_steps.zip.abc.tmp",
                 "checkpoint_99999_steps.zip.bak"):
        (directory / name).write_bytes(b"x")
    assert [p.name for p in store.checkpoints("run-1")] == [
        "checkpoint_50_steps.zip", "checkpoint_900_steps.zip", "checkpoint_1000_steps.zip",
    ]
    latest = store.latest_checkpoint("run-1")
    assert latest is not None
    assert latest.name == "checkpoint_1000_steps.zip"


def test_no_checkpoints(store: FileModelStore) -> None:
    assert store.checkpoints("run-none") == []
    assert store.latest_checkpoint("run-none") is None


def test_store_is_picklable(store: FileModelStore) -> None:
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store


def _stats(count: float) -> Any:
    import numpy as np

    from rl_service.core.models.normalization import NormalizeStats

    return NormalizeStats(obs_mean=np.zeros(3), obs_var=np.ones(3), obs_count=count, ret_mean=0.0, ret_var=1.0,
                          ret_count=count, norm_obs=True, norm_reward=True, clip_obs=10.0, clip_reward=10.0,
                          epsilon=1e-8, gamma=0.99)


def test_statistics_are_saved_pruned_and_deleted_with_their_checkpoint(store: FileModelStore) -> None:
    from rl_service.core.models.normalization import load_stats, stats_path

    model = FakeModel()
    for steps in (100, 200, 300, 400):
        path = store.save_checkpoint("run-1", model, steps, normalize=_stats(float(steps)))
        assert load_stats(stats_path(path)).obs_count == steps
    directory = store.checkpoint_run_dir("run-1")
    assert sorted(os.listdir(directory)) == sorted(
        [f"checkpoint_{s}_steps.zip" for s in (200, 300, 400)]
        + [f"checkpoint_{s}_steps.normalize.safetensors" for s in (200, 300, 400)])
    model_path = store.resolve_model_path("run-1", "elsewhere/final.zip")
    store.save_model(model, model_path, normalize=_stats(7.0))
    store.save_model(model, store.run_dir("run-1") / "best_model.zip", normalize=_stats(5.0))
    assert load_stats(stats_path(model_path)).obs_count == 7.0
    assert not [p for p in model_path.parent.iterdir() if p.name.endswith(".tmp")]
    store.delete_run("run-1", model_path)
    assert not directory.exists() and not store.run_dir("run-1").exists()
    assert not model_path.exists() and not stats_path(model_path).exists()


def test_a_failed_statistics_write_leaves_nothing(store: FileModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import rl_service.infra.model_store as module

    real = module.stats_bytes

    def broken(stats: object) -> bytes:  # the statistics' bytes are made, then the disk fills mid-write
        data = real(stats)  # type: ignore[arg-type]
        raise OSError(f"disk full after {len(data) // 2} of {len(data)} bytes")

    monkeypatch.setattr(module, "stats_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        store.save_checkpoint("run-1", FakeModel(), 100, normalize=_stats(1.0))
    assert not store.checkpoint_run_dir("run-1").exists() or not os.listdir(store.checkpoint_run_dir("run-1"))
