"""The command line's pure parts: argument parsing, text and JSON formatting, the progress bar, moving averages."""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from rich.console import Console

from rl_service import healthcheck_main
from rl_service.cli import client as cli_client
from rl_service.cli.formatting import (
    Output,
    format_duration,
    runs_table,
    state_name,
    status_table,
    status_to_dict,
)
from rl_service.cli.main import build_parser, run
from rl_service.cli.plotting import moving_average
from rl_service.cli.progress import RunProgress, eta_seconds, plain_line
from rl_service_proto.v1 import training_pb2 as pb

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _status(state: int = pb.RUNNING, done: int = 2_500, total: int = 10_000, sps: float = 500.0,
            episodes: int = 12) -> pb.TrainingStatus:
    return pb.TrainingStatus(
        run_id="run-0123456789ab", experiment_id="exp", algorithm="PPO", env_id="CartPole-v1", state=state,
        timesteps_done=done, total_timesteps=total, is_done=state not in (pb.PENDING, pb.RUNNING), seed=3,
        hyperparameters={"n_steps": "128"}, created_at=1.7e9,
        metrics=pb.TrainingMetrics(mean_episode_reward=21.5, mean_episode_length=21.5, episodes_completed=episodes,
                                   steps_per_second=sps, losses={"loss": 0.5}))


def test_parser_reads_repeatable_key_values_observations_and_states(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RL_SERVICE_ADDRESS", "10.1.2.3:6000")
    parser = build_parser()
    args = parser.parse_args(["train", "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", "100_000",
                              "--hp", "n_steps=256", "learning_rate=lin_0.001", "--hp", "gamma = 0.98"])
    assert args.timesteps == 100_000 and args.address == "10.1.2.3:6000"
    assert dict(args.hp) == {"n_steps": "256", "learning_rate": "lin_0.001", "gamma": "0.98"}
    args = parser.parse_args(["act", "run-x", "--obs", "0.1,0.2, 0.3,4", "--obs=-1,-2,3e-1,0"])
    assert args.obs == [[0.1, 0.2, 0.3, 4.0], [-1.0, -2.0, 0.3, 0.0]]
    assert parser.parse_args(["list", "--state", "succeeded"]).state == "SUCCEEDED"
    assert parser.parse_args(["export", "r", "--format", "ONNX"]).format == "onnx"
    monkeypatch.delenv("RL_SERVICE_ADDRESS")
    assert build_parser().parse_args(["list"]).address == "127.0.0.1:50051"


def test_status_to_dict_uses_natural_types() -> None:
    data = status_to_dict(_status())
    assert data["state"] == "RUNNING" and data["timesteps_done"] == 2_500 and isinstance(data["seed"], int)
    assert data["metrics"]["losses"] == {"loss": 0.5} and data["hyperparameters"] == {"n_steps": "128"}
    assert state_name(99) == "UNKNOWN(99)"


def test_durations_and_eta() -> None:
    assert format_duration(0) == "0:00:00" and format_duration(3725.4) == "1:02:05"
    assert eta_seconds(_status()) == pytest.approx(15.0)
    assert eta_seconds(_status(state=pb.PENDING)) is None and eta_seconds(_status(sps=0)) is None
    assert eta_seconds(_status(state=pb.SUCCEEDED)) == 0.0
    assert plain_line(_status()) == "RUNNING   2,500/10,000 steps  500 steps/s  ETA 0:00:15  reward 21.50"
    assert plain_line(_status(episodes=0, sps=0)).endswith("- steps/s  ETA -:--:--  reward -")


def test_progress_bar_renders_into_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system="standard")
    with RunProgress(console) as progress:
        for done in (0, 2_500, 10_000):
            progress.update(_status(done=done))
        progress.update(_status(state=pb.SUCCEEDED, done=10_240))
    text = ANSI.sub("", out.getvalue())
    assert "━" in text and "RUNNING" in text and "SUCCEEDED" in text
    assert "2,500/10,000 steps" in text and "10,240/10,000 steps" in text
    assert "500 steps/s" in text and "ETA 0:00:15" in text and "reward 21.50" in text


def test_progress_off_a_terminal_prints_plain_lines() -> None:
    out = io.StringIO()
    with RunProgress(Console(file=out, width=200)) as progress:
        progress.update(_status(done=100))
        progress.update(_status(done=200))  # within the interval: not printed
        progress.update(_status(state=pb.SUCCEEDED, done=10_000))
    assert out.getvalue().splitlines() == [plain_line(_status(done=100)),
                                           plain_line(_status(state=pb.SUCCEEDED, done=10_000))]


def test_runs_table() -> None:
    out = io.StringIO()
    resumed = _status()
    resumed.attempt = 3
    Console(file=out, width=120).print(runs_table([resumed, _status(state=pb.FAILED, episodes=0)]))
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["RUN", "EXPERIMENT", "ALGO", "ENV", "STATE", "TRY", "TIMESTEPS", "REWARD", "CREATED"]
    assert "RUNNING" in lines[1] and "2,500/10,000" in lines[1] and "21.50" in lines[1]
    assert lines[1].split()[5] == "3" and lines[2].split()[5] == "1", "a status without attempts reads as the first"
    assert "FAILED" in lines[2] and lines[2].split()[-3] == "-"


def test_owners_show_in_the_table_only_when_a_run_has_one_and_in_the_details() -> None:
    owned, unowned = _status(), _status(state=pb.FAILED)
    owned.owner = "alice"
    out = io.StringIO()
    Console(file=out, width=140).print(runs_table([owned, unowned]))
    header, first, second = out.getvalue().splitlines()
    assert header.split()[:4] == ["RUN", "EXPERIMENT", "OWNER", "ALGO"]
    assert first.split()[2] == "alice" and second.split()[2] == "-"
    details = io.StringIO()
    Console(file=details, width=140).print(status_table(owned))
    assert any(line.split() == ["owner", "alice"] for line in details.getvalue().splitlines())
    Console(file=details, width=140).print(status_table(unowned))
    assert sum(line.split()[:1] == ["owner"] for line in details.getvalue().splitlines()) == 1
    assert status_to_dict(owned)["owner"] == "alice" and status_to_dict(unowned)["owner"] == ""


def test_moving_average_is_a_trailing_window() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_allclose(moving_average(values, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average(values, 100), [1.0, 1.5, 2.0, 2.5, 3.0])
    assert moving_average([], 10).size == 0


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details", "reason"), [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                                  "Failed to connect to remote host: Connection refused", "connection refused"),
    (grpc.StatusCode.UNAVAILABLE, "errors resolving nohost:1: [field:hostname lookup error:address lookup failed "
                                  "for nohost:1: Domain name not found]", "domain name not found"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "no answer within 5s"),
])
def test_unreachable_names_the_address_and_the_reason(code: grpc.StatusCode, details: str, reason: str) -> None:
    error = cli_client.unreachable("host:1", _FakeRpcError(code, details), 5.0)
    assert error.exit_code == 2 and error.message == f"cannot reach the server at host:1: {reason}"
    server = cli_client.server_error(_FakeRpcError(grpc.StatusCode.NOT_FOUND, "run_id: no run 'x'"))
    assert server.exit_code == 1 and server.message == "ERROR NOT_FOUND: run_id: no run 'x'"


@pytest.mark.parametrize("terminal", [False, True])
def test_tables_carry_no_trailing_padding(terminal: bool) -> None:
    out = io.StringIO()
    output = Output(Console(file=out, width=200, force_terminal=terminal, color_system="standard" if terminal
                            else None), Console(file=io.StringIO()))
    status = _status()
    status.metrics.losses.update({f"loss_{i}": 0.25 for i in range(12)})  # one row much wider than the others
    output.table(status_table(status))
    output.table(runs_table([status]))
    lines = ANSI.sub("", out.getvalue()).splitlines()
    assert any(line.startswith("run") and "run-0123456789ab" in line for line in lines)
    assert any("loss_11=0.25" in line for line in lines)
    assert lines and all(line == line.rstrip() for line in lines)
    assert max(len(line) for line in lines) > 100 > len(next(line for line in lines if line.startswith("seed")))


# ----------------------------------------------------------------------------------------------- field of an error


class _RichRpcError(_FakeRpcError):
    """A server error as grpc raises it on the client: code, message, and the trailers rich details travel in."""

    def __init__(self, status: status_pb2.Status, details: str | None = None) -> None:
        sent = rpc_status.to_status(status)
        super().__init__(sent.code, status.message if details is None else details)
        self._trailers = sent.trailing_metadata

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


def _bad_request(message: str, *fields: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
                 ) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    if fields:
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=message) for f in fields]))
    return status


def test_server_error_prints_the_field_on_a_second_line() -> None:
    message = "hyperparameters['learning_rate']: cannot use 'abc'; expected a number > 0"
    error = cli_client.server_error(_RichRpcError(_bad_request(message, "hyperparameters.learning_rate")))
    assert error.exit_code == 1
    assert error.message == f"ERROR INVALID_ARGUMENT: {message}\nfield: hyperparameters.learning_rate"
    assert error.message.startswith(f"ERROR INVALID_ARGUMENT: {message}"), "the first line is as before"
    two = cli_client.server_error(_RichRpcError(_bad_request("spec: bad", "spec.box.low", "spec.box.high")))
    assert two.message == "ERROR INVALID_ARGUMENT: spec: bad\nfield: spec.box.low, spec.box.high"


@pytest.mark.parametrize("error", [
    _FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "algorithm: unknown"),  # no trailers at all (older server)
    _RichRpcError(_bad_request("algorithm: unknown")),  # a status without details
    _RichRpcError(_bad_request("algorithm: unknown", "algorithm"), details="another message"),  # inconsistent
    _RichRpcError(_bad_request("algorithm: unknown", "")),  # a violation without a field
], ids=["no trailers", "no details", "inconsistent", "empty field"])
def test_server_error_without_a_usable_field_is_one_line(error: grpc.RpcError) -> None:
    message = cli_client.server_error(error).message
    assert "\n" not in message and message.startswith("ERROR INVALID_ARGUMENT: ")


def test_server_error_escapes_control_characters_in_the_field() -> None:
    status = _bad_request("hyperparameters: unknown key", "hyperparameters.a\x1b[31m\nb")
    error = cli_client.server_error(_RichRpcError(status))
    assert error.message.endswith("\nfield: hyperparameters.a\\x1b[31m\\nb")
    assert error.message.count("\n") == 1 and "\x1b" not in error.message


# ----------------------------------------------------------------------------------------------- health exit codes


def _closed_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A bare gRPC server with only the standard health service (its statuses set by each test)."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), Output(Console(file=out, width=200), Console(file=err, width=200)))
    return code, out.getvalue(), err.getvalue()


def _probe_script(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """healthcheck.py's main: exit code and stdout (argparse's usage errors exit 2 through SystemExit)."""
    try:
        code = healthcheck_main.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    return code, capsys.readouterr().out


def test_health_when_nothing_listens_exits_1_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    address = _closed_address()
    expected = f"cannot reach the server at {address}: connection refused (UNAVAILABLE)\n"
    assert _probe_script(capsys, "--address", address, "--timeout", "5") == (1, expected)
    assert _cli("health", "--address", address) == (1, expected, "")
    code, out, _ = _cli("health", "--address", address, "--json")
    assert code == 1 and json.loads(out) == {"address": address, "service": "", "serving": False,
                                             "status": expected.strip()}


def test_health_when_no_answer_comes_in_time_exits_1_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) but never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        expected = f"cannot reach the server at {address}: no answer within 0.5s (DEADLINE_EXCEEDED)\n"
        assert _probe_script(capsys, "--address", address, "--timeout", "0.5") == (1, expected)
        assert _cli("health", "--address", address, "--timeout", "0.5") == (1, expected, "")


@pytest.mark.parametrize(("serving", "service", "code", "status"), [
    (health_pb2.HealthCheckResponse.SERVING, "", 0, "SERVING"),
    (health_pb2.HealthCheckResponse.NOT_SERVING, "", 1, "NOT_SERVING"),
    (health_pb2.HealthCheckResponse.SERVING, "no.such.Service", 1, "NOT_FOUND"),
])
def test_health_entry_points_agree(health_server: tuple[str, health.HealthServicer],
                                   capsys: pytest.CaptureFixture[str], serving: int, service: str, code: int,
                                   status: str) -> None:
    address, servicer = health_server
    servicer.set("", serving)
    script_code, script_out = _probe_script(capsys, "--address", address, "--service", service)
    cli_code, cli_out, cli_err = _cli("health", "--address", address, "--service", service)
    assert script_code == cli_code == code and script_out == cli_out and not cli_err
    assert cli_out.startswith(f"{address}: {status}") and cli_out.endswith("\n") and cli_out.count("\n") == 1
    report = healthcheck_main.probe(address, service)
    assert report.exit_code == code and report.serving is (code == 0) and report.text == cli_out.strip()


def test_health_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--timeout", "0"], ["--timeout", "soon"], ["--address", ""], ["--bogus"]):
        assert _probe_script(capsys, *argv)[0] == 2, argv
    address = _closed_address()
    for argv in (["--timeout", "-1"], ["--cert-file", "c.pem"], ["--bogus"]):
        code, out, _ = _cli("health", "--address", address, *argv)
        assert code == 2 and not out, argv
