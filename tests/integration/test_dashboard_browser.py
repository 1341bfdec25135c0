"""The dashboard end to end in headless Chromium (Debian's chromium, driven by Playwright through executable_path;
scripts/install_browser.sh installs it): a field error shown beside its field, a CartPole PPO run started from
the form whose progress bar reaches the end and whose curve rises, a second run stopped, an export downloaded,
the runs table filtered. Screenshots go to the directory the test prints (RL_SERVICE_TEST_ARTIFACTS, else a
temporary one)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import ServerHandle, start_server

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
PLAYWRIGHT = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
# Small enough for a second or two of training per thousand steps, long enough for CartPole's reward to rise.
TIMESTEPS = 8192
HYPERPARAMETERS = {"n_steps": "256", "batch_size": "64", "n_epochs": "4"}
TIMEOUT_MS = 240_000


def chromium_path() -> str | None:
    """Debian's chromium, or CHROMIUM_PATH; None when neither is there."""
    explicit = os.environ.get("CHROMIUM_PATH")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((found for name in CHROMIUM_CANDIDATES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium on this machine: run scripts/install_browser.sh (as root, with apt) to install it")
    return path


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("RL_SERVICE_TEST_ARTIFACTS")
    directory = Path(root) / "dashboard" if root else tmp_path_factory.mktemp("dashboard-artefacts")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots and downloads: {directory}")
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path_factory.mktemp("dashboard"), http_enabled=True)
    yield handle
    handle.stop()


def test_the_dashboard_starts_watches_stops_and_exports_runs(server: ServerHandle, browser_path: str,
                                                             artefacts: Path) -> None:
    base = f"http://127.0.0.1:{server.running.http_port}"
    with PLAYWRIGHT.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 1000}).new_page()
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base + "/")
            page.wait_for_selector('[data-testid="hp-n_steps"]', state="attached")
            page.click('[data-testid="hyperparameters"]')  # the table opens from its summary

            # The form is built from /v1/algorithms: defaults as placeholders; the server's error beside its field.
            assert page.get_attribute('[data-testid="hp-n_steps"]', "placeholder") == "2048"
            page.fill('[data-testid="total_timesteps"]', str(TIMESTEPS))
            page.fill('[data-testid="experiment_id"]', "browser")
            page.fill('[data-testid="seed"]', "3")
            page.fill('[data-testid="hp-n_steps"]', "lots")
            page.click('[data-testid="start-button"]')
            field_error = page.locator('[data-field="hyperparameters.n_steps"]')
            field_error.filter(has_text="n_steps").wait_for()
            assert "cannot use 'lots'" in field_error.inner_text()
            page.screenshot(path=str(artefacts / "01-field-error.png"), full_page=True)

            for key, value in HYPERPARAMETERS.items():
                page.fill(f'[data-testid="hp-{key}"]', value)
            page.click('[data-testid="start-button"]')
            page.wait_for_url("**/#/runs/*")
            page.locator('[data-testid="run-state"]', has_text="SUCCEEDED").wait_for(timeout=TIMEOUT_MS)
            run_id = page.inner_text('[data-testid="run-id"]')
            assert page.url.endswith(f"#/runs/{run_id}") and server.status(run_id).experiment_id == "browser"
            bar = page.locator('[data-testid="run-progress"]')
            assert bar.get_attribute("data-done") == bar.get_attribute("data-total") == str(TIMESTEPS)
            assert bar.evaluate("node => node.style.width") == "100%"
            curve = page.locator('[data-testid="curve"]')
            page.wait_for_function("() => Number(document.getElementById('curve').dataset.episodes) > 20")
            first, last = (float(curve.get_attribute(f"data-{end}-average") or "nan") for end in ("first", "last"))
            assert last > first, f"the moving average did not rise: {first} -> {last}"
            page.screenshot(path=str(artefacts / "02-run-succeeded.png"), full_page=True)

            with page.expect_download() as download_info:
                page.click('[data-testid="export-torchscript"]')
            download = download_info.value
            assert download.suggested_filename == f"{run_id}.pt"
            saved = artefacts / download.suggested_filename
            download.save_as(str(saved))
            assert torch.jit.load(io.BytesIO(saved.read_bytes())) is not None

            # A second run, started over the API, stopped from its page.
            second = httpx.post(base + "/v1/runs", json={"algorithm": "PPO", "env_id": "CartPole-v1",
                                                         "total_timesteps": 10_000_000, "experiment_id": "browser",
                                                         "hyperparameters": HYPERPARAMETERS}, timeout=30)
            second_id = second.json()["run_id"]
            server.wait_until(second_id, lambda s: s.timesteps_done > 0, timeout=120)
            page.goto(f"{base}/#/runs/{second_id}")
            page.locator('[data-testid="run-state"]', has_text="RUNNING").wait_for()
            page.click('[data-testid="stop-button"]')
            page.locator('[data-testid="run-state"]', has_text="CANCELLED").wait_for(timeout=TIMEOUT_MS)
            assert page.is_enabled('[data-testid="resume-button"]') and page.is_disabled('[data-testid="stop-button"]')
            page.screenshot(path=str(artefacts / "03-run-stopped.png"), full_page=True)

            # The runs table, filtered by experiment and state.
            page.goto(base + "/#/")
            page.fill('[data-testid="filter-experiment"]', "browser")
            page.select_option('[data-testid="filter-state"]', "SUCCEEDED")
            rows = page.locator('[data-testid="runs-table"] tbody tr')
            page.wait_for_function("() => document.querySelectorAll('#runs tr').length === 1 && "
                                   "document.querySelector('#runs tr').dataset.state === 'SUCCEEDED'")
            assert rows.first.get_attribute("data-run-id") == run_id
            page.screenshot(path=str(artefacts / "04-runs-table.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
