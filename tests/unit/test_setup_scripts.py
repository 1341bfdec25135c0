"""The front door: setup.sh installs only when the requirements changed, test.sh fetches the Node.js packages only
when package-lock.json changed, and pyproject.toml declares what the default install needs.

The scripts run for real, from a copy of the repository's layout in a temporary directory, against stub commands
(a .venv/bin/python, python3 and npm that record their arguments): no network, no pip, a fraction of a second each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the set-up scripts are bash scripts")

# Appends its arguments to $STUB_LOG (one line per call), prints $STUB_STDERR, exits with $STUB_RC (default 0).
STUB = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
[ -n "${STUB_STDERR:-}" ] && echo "$STUB_STDERR" >&2
exit "${STUB_RC:-0}"
"""


@dataclass
class Checkout:
    """A temporary copy of the repository's layout with stub commands; run() runs one of its scripts."""

    root: Path
    bin: Path
    log: Path

    def run(self, script: str, *args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {**os.environ, "PATH": path or f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                   "STUB_LOG": str(self.log), **env}
        return subprocess.run(["bash", str(self.root / script), *args], env=environ, capture_output=True,
                              text=True, timeout=30, check=False)

    def calls(self) -> list[str]:
        """The stubs' calls so far, then forgets them."""
        calls = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.unlink(missing_ok=True)
        return calls

    def pip_installs(self) -> list[str]:
        return [call for call in self.calls() if "pip install" in call and "--upgrade pip" not in call]


def _stub(path: Path, text: str = STUB) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    root = tmp_path / "repo"
    for name in ("scripts/setup.sh", "scripts/test.sh", "pyproject.toml", "constraints.txt",
                 "examples/node-simulation/package-lock.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    stubs = tmp_path / "bin"
    # python3 -m venv .venv: a "venv" whose python is the recording stub.
    _stub(stubs / "python3", f'#!/bin/sh\necho "python3 $*" >> "$STUB_LOG"\n'
                             f'mkdir -p .venv/bin && cp "{stubs / "python"}" .venv/bin/python\n')
    _stub(stubs / "python")
    # npm ci --prefix DIR ...: creates DIR/node_modules, as the real one does.
    _stub(stubs / "npm", '#!/bin/sh\necho "npm $*" >> "$STUB_LOG"\n[ -n "${STUB_RC:-}" ] && exit "$STUB_RC"\n'
                         'mkdir -p "$3/node_modules"\n')
    return Checkout(root, stubs, tmp_path / "calls.log")


def _installed_extras(checkout: Checkout) -> str:
    return (checkout.root / ".venv/.rl-service-install").read_text().split(" ", 1)[1].strip()


# --- scripts/setup.sh ---------------------------------------------------------------------------------------------


def test_first_run_creates_the_venv_and_installs_editable_with_the_constraints(checkout: Checkout) -> None:
    result = checkout.run("scripts/setup.sh")
    assert result.returncode == 0, result.stderr
    calls = checkout.calls()
    assert calls[0] == "python3 -m venv .venv"
    assert calls[-1] == "-m pip install --quiet -c constraints.txt -e ."
    assert (checkout.root / ".venv/.rl-service-install").is_file()


def test_a_second_run_with_nothing_changed_skips_pip_and_prints_nothing(checkout: Checkout) -> None:
    checkout.run("scripts/setup.sh")
    checkout.calls()
    result = checkout.run("scripts/setup.sh")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert checkout.calls() == []


def test_extras_already_installed_are_not_installed_again(checkout: Checkout) -> None:
    checkout.run("scripts/setup.sh", "dev")
    assert checkout.pip_installs() == ['-m pip install --quiet -c constraints.txt -e .[dev]']
    # serve.sh after test.sh: the dev install covers the plain one.
    assert checkout.run("scripts/setup.sh").stderr == ""
    assert checkout.run("scripts/setup.sh", "dev").stderr == ""
    assert checkout.calls() == []


def test_a_new_extra_is_installed_together_with_those_installed_before(checkout: Checkout) -> None:
    checkout.run("scripts/setup.sh", "dev")
    checkout.calls()
    checkout.run("scripts/setup.sh", "tensorboard")
    assert checkout.pip_installs() == ['-m pip install --quiet -c constraints.txt -e .[dev,tensorboard]']
    assert _installed_extras(checkout) == "dev,tensorboard"


@pytest.mark.parametrize("changed", ["pyproject.toml", "constraints.txt"])
def test_a_changed_requirement_file_reinstalls_keeping_the_extras(checkout: Checkout, changed: str) -> None:
    checkout.run("scripts/setup.sh", "dev")
    checkout.calls()
    with (checkout.root / changed).open("a") as file:
        file.write("\n# changed\n")
    result = checkout.run("scripts/setup.sh")
    assert checkout.pip_installs() == ['-m pip install --quiet -c constraints.txt -e .[dev]']
    assert "installing rl-service[dev]" in result.stderr
    assert checkout.run("scripts/setup.sh").stderr == ""  # and the new stamp holds


def test_a_failed_install_shows_the_error_and_is_retried_next_time(checkout: Checkout) -> None:
    checkout.run("scripts/setup.sh")
    (checkout.root / ".venv/.rl-service-install").unlink()
    result = checkout.run("scripts/setup.sh", STUB_RC="1", STUB_STDERR="ERROR: No matching distribution")
    assert result.returncode != 0
    assert "ERROR: No matching distribution" in result.stderr
    assert not (checkout.root / ".venv/.rl-service-install").exists()
    checkout.calls()
    checkout.run("scripts/setup.sh")
    assert len(checkout.pip_installs()) == 1


# --- scripts/test.sh: the Node.js simulation's packages ------------------------------------------------------------


@pytest.fixture
def test_checkout(checkout: Checkout) -> Checkout:
    """test.sh's own steps only: setup.sh is a no-op and .venv/bin/python (ruff, mypy, pytest) the stub."""
    _stub(checkout.root / "scripts/setup.sh", "#!/bin/sh\n")
    _stub(checkout.root / ".venv/bin/python")
    return checkout


def test_npm_ci_runs_once_until_package_lock_changes(test_checkout: Checkout) -> None:
    result = test_checkout.run("scripts/test.sh", "-k", "x")
    assert result.returncode == 0, result.stderr
    calls = test_checkout.calls()
    assert calls[0].startswith("npm ci --prefix examples/node-simulation")
    assert calls[-1] == "-m pytest --cov=rl_service --cov-report=term -k x"

    result = test_checkout.run("scripts/test.sh")
    assert (result.stdout, result.stderr) == ("", "")
    assert not any(call.startswith("npm") for call in test_checkout.calls())

    with (test_checkout.root / "examples/node-simulation/package-lock.json").open("a") as file:
        file.write("\n")
    test_checkout.run("scripts/test.sh")
    assert test_checkout.calls()[0].startswith("npm ci")


def test_a_failed_npm_ci_warns_runs_the_tests_and_is_retried(test_checkout: Checkout) -> None:
    result = test_checkout.run("scripts/test.sh", STUB_RC="1")
    assert "npm ci failed" in result.stderr
    assert test_checkout.calls()[0].startswith("npm ci")
    test_checkout.run("scripts/test.sh")
    assert test_checkout.calls()[0].startswith("npm ci")


def test_without_npm_the_step_is_skipped_quietly(test_checkout: Checkout, tmp_path: Path) -> None:
    # A PATH holding only what test.sh itself uses, so that no npm can be found.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "dirname", "cat", "cksum"):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    result = test_checkout.run("scripts/test.sh", path=str(tools))
    assert (result.returncode, result.stderr) == (0, "")
    assert [call.split()[1] for call in test_checkout.calls()] == ["ruff", "mypy", "pytest"]


# --- pyproject.toml ------------------------------------------------------------------------------------------------


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it() -> None:
    # A table (`{ text = ... }`) makes setuptools print a deprecation warning on every install.
    assert isinstance(PYPROJECT["project"]["license"], str)
    setuptools = next(Requirement(r) for r in PYPROJECT["build-system"]["requires"]
                      if Requirement(r).name == "setuptools")
    assert not setuptools.specifier.contains("76.9"), "PEP 639 license strings need setuptools>=77"


@pytest.mark.parametrize("name", ["onnx", "onnxscript", "grpcio-status", "googleapis-common-protos"])
def test_the_default_install_has_onnx_export_and_rich_error_details(name: str) -> None:
    runtime = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    assert name in runtime


def test_grpcio_status_is_at_least_the_grpcio_the_stubs_need() -> None:
    requirements = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    assert not requirements["grpcio-status"].specifier.contains("1.85.0")
