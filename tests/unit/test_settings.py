"""rl_service.infra.settings: defaults, environment variables, .env, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rl_service.infra.settings import Settings, describe_validation_error


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No stray variables or .env file from the developer's shell or checkout."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _error(**env: str) -> str:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with pytest.raises(ValidationError) as info:
            Settings()
    return describe_validation_error(info.value)


def test_defaults() -> None:
    settings = Settings()
    assert settings.grpc_host == "127.0.0.1"
    assert settings.grpc_port == 50051
    assert settings.address == "127.0.0.1:50051"
    assert settings.data_dir == Path("rl_service_data")
    assert settings.models_root == Path("rl_service_data") / "models"
    assert settings.checkpoint_root == Path("rl_service_data") / "checkpoints"
    assert settings.registry_path == Path("rl_service_data") / "runs.sqlite3"
    assert settings.log_level == "INFO"
    assert settings.log_format == "json"
    assert settings.max_concurrent_runs == 2
    assert settings.keep_checkpoints == 5
    assert settings.worker_start_method == "forkserver"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRPC_HOST", "0.0.0.0")
    monkeypatch.setenv("GRPC_PORT", "6000")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("MAX_CONCURRENT_RUNS", "4")
    monkeypatch.setenv("LOG_FORMAT", "console")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PROGRESS_INTERVAL_SECONDS", "0.25")
    settings = Settings()
    assert settings.address == "0.0.0.0:6000"
    assert settings.max_concurrent_runs == 4
    assert settings.log_format == "console"
    assert settings.log_level == "DEBUG"
    assert settings.progress_interval_seconds == 0.25
    assert settings.models_root == tmp_path / "d" / "models"
    assert settings.checkpoint_root == tmp_path / "d" / "checkpoints"
    assert settings.registry_path == tmp_path / "d" / "runs.sqlite3"


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("grpc_port", "7000")
    assert Settings().grpc_port == 7000


def test_explicit_dirs_override_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "c"))
    settings = Settings()
    assert settings.models_root == tmp_path / "m"
    assert settings.checkpoint_root == tmp_path / "c"
    assert settings.registry_path == tmp_path / "d" / "runs.sqlite3"


def test_init_values_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_PORT", "6000")
    assert Settings(grpc_port=7000).grpc_port == 7000


def test_ipv6_host_is_bracketed() -> None:
    assert Settings(grpc_host="::1", grpc_port=1).address == "[::1]:1"


def test_dotenv_in_working_directory_is_read(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_environment / ".env").write_text("GRPC_PORT=6100\nMAX_QUEUED_RUNS=3\nUNRELATED=1\n")
    settings = Settings()
    assert settings.grpc_port == 6100
    assert settings.max_queued_runs == 3
    monkeypatch.setenv("GRPC_PORT", "6200")
    assert Settings().grpc_port == 6200  # the environment beats .env


@pytest.mark.parametrize(("env", "variable"), [
    ({"MAX_CONCURRENT_RUNS": "abc"}, "MAX_CONCURRENT_RUNS"),
    ({"MAX_CONCURRENT_RUNS": "0"}, "MAX_CONCURRENT_RUNS"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"LOG_LEVEL": "TRACE"}, "LOG_LEVEL"),
    ({"GRPC_PORT": "70000"}, "GRPC_PORT"),
    ({"GRPC_PORT": "-1"}, "GRPC_PORT"),
    ({"KEEP_CHECKPOINTS": "0"}, "KEEP_CHECKPOINTS"),
    ({"PROGRESS_INTERVAL_SECONDS": "0"}, "PROGRESS_INTERVAL_SECONDS"),
    ({"WORKER_START_METHOD": "fork"}, "WORKER_START_METHOD"),
    ({"DEFAULT_CHECKPOINT_INTERVAL": "99"}, "DEFAULT_CHECKPOINT_INTERVAL"),
])
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    text = _error(**env)
    assert text.startswith("invalid configuration: ")
    assert f"{variable}: " in text
    assert "\n" not in text


def test_several_invalid_values_on_one_line() -> None:
    text = _error(MAX_CONCURRENT_RUNS="abc", LOG_FORMAT="xml")
    assert "\n" not in text
    assert "MAX_CONCURRENT_RUNS: " in text
    assert "LOG_FORMAT: " in text
    assert "; " in text


def test_whole_model_error_is_described_as_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    # The start-method check runs after field validation and has no field location.
    from rl_service.infra import settings as settings_module

    monkeypatch.setattr(settings_module.multiprocessing, "get_all_start_methods", lambda: ["fork", "spawn"])
    text = _error(WORKER_START_METHOD="forkserver")
    assert text.startswith("invalid configuration: configuration: ")
    assert "WORKER_START_METHOD forkserver is not available" in text
    assert "\n" not in text


def test_empty_models_dir_means_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("MODELS_DIR", "")
    assert Settings().models_root == tmp_path / "d" / "models"


@pytest.mark.parametrize(("env", "variable", "words"), [
    ({"TLS_CERT_FILE": "/etc/rl/server.crt"}, "TLS_KEY_FILE", "is required when TLS_CERT_FILE is set"),
    ({"TLS_KEY_FILE": "/etc/rl/server.key"}, "TLS_KEY_FILE", "TLS_CERT_FILE is not"),
    ({"TLS_CLIENT_CA_FILE": "/etc/rl/ca.crt"}, "TLS_CLIENT_CA_FILE", "TLS_CERT_FILE is not"),
    ({"TLS_CLIENT_CA_FILE": "/etc/rl/ca.crt", "TLS_KEY_FILE": "/k"}, "TLS_CLIENT_CA_FILE", "mutual TLS"),
])
def test_tls_files_come_in_pairs(env: dict[str, str], variable: str, words: str) -> None:
    text = _error(**env)
    assert f"{variable}: " in text and words in text and "\n" not in text


def test_tls_settings_are_paths_read_only_at_start_up() -> None:
    """Validation checks the combination; the files themselves are read when the server starts."""
    assert Settings().tls_cert_file is None and not Settings().allow_insecure
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLS_CERT_FILE", "/no/such/cert.pem")
        mp.setenv("TLS_KEY_FILE", "/no/such/key.pem")
        mp.setenv("TLS_CLIENT_CA_FILE", "/no/such/ca.pem")
        settings = Settings()
    assert settings.tls_cert_file == Path("/no/such/cert.pem")
    assert settings.tls_client_ca_file == Path("/no/such/ca.pem")
