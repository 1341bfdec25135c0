"""Start-up owns the data directories: it removes the temp files a crash left in each of them, and only there."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rl_service.infra.data_dir_lock import DataDirLock
from tests.conftest import ServerHandle


def test_start_up_removes_crash_temp_files_from_every_data_dir_and_nowhere_else(
        server_factory: Callable[..., ServerHandle], tmp_path: Path) -> None:
    # MODELS_DIR, CHECKPOINT_DIR and POLICIES_DIR outside DATA_DIR: each is cleaned in its own right.
    temps = [tmp_path / "data" / ".runs.sqlite3.abcd1234.tmp",
             tmp_path / "models" / "run-1" / ".history.json.a_b_c_d_.tmp",
             tmp_path / "checkpoints" / "run-1" / ".checkpoint_9_steps.zip.zz99zz99.tmp",
             tmp_path / "policies" / "p" / ".state.safetensors.k2j3h4g5.tmp"]
    kept = [tmp_path / "elsewhere" / ".model.zip.abcd1234.tmp", tmp_path / ".model.zip.abcd1234.tmp",
            tmp_path / "checkpoints" / "run-1" / "checkpoint_9_steps.zip.tmp"]
    for path in temps + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    handle = server_factory(policies_dir=tmp_path / "policies")
    assert not any(path.exists() for path in temps)
    assert all(path.exists() for path in kept)
    handle.stop()
    DataDirLock.acquire(tmp_path / "data", wait_seconds=0).release()  # a stopped server lets go of DATA_DIR
