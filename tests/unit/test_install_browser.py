"""scripts/install_browser.sh's decisions that need no network: a browser already there, and no apt-get (exit 0
with the reason, so that the browser test skips rather than CI failing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_browser.sh"


def _run(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run([bash, str(SCRIPT)], env={"PATH": str(bin_dir)}, capture_output=True, text=True,
                          timeout=30, check=False)


def _link(bin_dir: Path, *names: str) -> None:
    for name in names:
        found = shutil.which(name)
        assert found is not None
        os.symlink(found, bin_dir / name)


def test_a_chromium_on_path_is_kept(tmp_path: Path) -> None:
    _link(tmp_path, "id")
    (tmp_path / "chromium").write_text("#!/bin/sh\n")
    (tmp_path / "chromium").chmod(0o755)
    result = _run(tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"install_browser: {tmp_path}/chromium is already installed"


def test_without_apt_get_it_says_so_and_succeeds(tmp_path: Path) -> None:
    _link(tmp_path, "id")
    result = _run(tmp_path)
    assert result.returncode == 0 and "no apt-get on this machine" in result.stdout and "skipped" in result.stdout
