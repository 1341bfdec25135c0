"""The `rl-service` command line against a real server: every subcommand, its output for people and for scripts,
its exit codes, and the files it writes (a learning-curve PNG; exports that load in a clean process)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from rich.console import Console
from stable_baselines3 import PPO

from rl_service.cli.formatting import Output
from rl_service.cli.main import run
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle

SCRIPT = Path(sys.executable).parent / "rl-service"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RUN_ID = re.compile(r"run-[0-9a-f]{12}")
FAST_HP = [f"{k}={v}" for k, v in FAST_PPO.items()]
TIMESTEPS = 2048


@dataclass
class Result:
    """What one in-process CLI invocation returned and printed."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        """stdout without terminal escape codes."""
        return ANSI.sub("", self.out)


def cli(*argv: str, terminal: bool = False) -> Result:
    """Run the CLI's main in this process; `terminal` renders stdout as a 100-column colour terminal would."""
    out, err = io.StringIO(), io.StringIO()
    colours = "standard" if terminal else None
    output = Output(Console(file=out, force_terminal=terminal, width=100, color_system=colours),
                    Console(file=err, width=200))
    return Result(run(list(argv), output), out.getvalue(), err.getvalue())


def at(server: ServerHandle, *argv: str, terminal: bool = False) -> Result:
    """`cli` with --address pointing at the test server (placed after the subcommand, as a user types it)."""
    return cli(argv[0], "--address", server.address, *argv[1:], terminal=terminal)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def observations(count: int = 16) -> np.ndarray:
    """CartPole-like observations near the upright state."""
    return np.random.default_rng(1).uniform(-0.2, 0.2, size=(count, 4)).astype(np.float32)


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    """Run the test in its temp directory, where commands write their default file names."""
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def trained(server: ServerHandle) -> tuple[str, Result]:
    """One PPO run on CartPole trained with `rl-service train`, its progress bar rendered into a terminal."""
    result = at(server, "train", "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", str(TIMESTEPS),
                "--hp", *FAST_HP, "--seed", "5", "--experiment", "cli", "--checkpoint-interval", "500",
                terminal=True)
    match = RUN_ID.search(result.text)
    assert match, result
    return match.group(0), result


# ----------------------------------------------------------------------------------------------- train / watch


def test_train_follows_the_run_with_a_live_progress_bar(server: ServerHandle, trained: tuple[str, Result]) -> None:
    run_id, result = trained
    assert result.code == 0, result.err
    assert "\x1b[" in result.out, "rendered as a colour terminal"
    text = result.text
    assert f"started {run_id}: PPO on CartPole-v1 for {TIMESTEPS:,} timesteps (experiment cli)" in text
    assert "━" in text, "a bar is drawn"
    assert re.search(r"RUNNING\s+━", text), "the bar shows the state while training"
    assert re.search(rf"[\d,]+/{TIMESTEPS:,} steps", text), "timesteps done/total"
    assert re.search(r"[\d,]+ steps/s", text) and re.search(r"ETA \d:\d\d:\d\d", text)
    assert re.search(r"reward \d+\.\d\d", text), "mean reward once episodes end"
    assert f"SUCCEEDED {run_id}: " in text and "mean reward" in text
    status = server.status(run_id)
    assert status.state == pb.SUCCEEDED and f"model: {status.model_path}" in text
    assert not result.err


def test_train_detach_then_watch_as_text_and_json(server: ServerHandle) -> None:
    detached = at(server, "train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "512", "--hp",
                  *FAST_HP, "--detach")
    assert detached.code == 0 and RUN_ID.fullmatch(detached.out.strip()), detached
    run_id = detached.out.strip()

    watched = at(server, "watch", run_id)  # not a terminal: plain lines, no escape codes
    assert watched.code == 0, watched.err
    assert "\x1b[" not in watched.out
    assert re.search(r"SUCCEEDED\s+[\d,]+/512 steps", watched.out) and f"SUCCEEDED {run_id}" in watched.out

    as_json = at(server, "watch", run_id, "--json")
    lines = [json.loads(line) for line in as_json.out.splitlines()]
    assert as_json.code == 0 and lines[-1]["state"] == "SUCCEEDED" and lines[-1]["run_id"] == run_id
    assert lines[-1]["timesteps_done"] >= 512 and lines[-1]["metrics"]["episodes_completed"] > 0

    as_json = at(server, "train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "256", "--hp", *FAST_HP,
                 "--json")
    lines = [json.loads(line) for line in as_json.out.splitlines()]
    assert as_json.code == 0 and lines[-1]["state"] == "SUCCEEDED" and len({s["run_id"] for s in lines}) == 1


def test_train_reports_failed_runs_and_bad_requests(server: ServerHandle) -> None:
    from tests.support.envs import CRASH_ENV_ID

    failed = at(server, "train", "--algo", "PPO", "--env", CRASH_ENV_ID, "--timesteps", "5000",
                "--hp", "n_steps=64", "batch_size=32", "n_epochs=1")
    assert failed.code == 1
    assert re.search(r"FAILED run-[0-9a-f]{12} at [\d,]+/5,000 timesteps: RuntimeError: .*deliberate crash", failed.err)

    bad = at(server, "train", "--algo", "HER", "--env", "CartPole-v1", "--timesteps", "100")
    assert bad.code == 1
    assert bad.err.startswith("ERROR INVALID_ARGUMENT: algorithm: unknown algorithm 'HER'"), bad.err
    bad_hp = at(server, "train", "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", "100", "--hp", "gamma=2")
    assert bad_hp.code == 1 and bad_hp.err.startswith("ERROR INVALID_ARGUMENT:") and "gamma" in bad_hp.err


# ----------------------------------------------------------------------------------------------- inspect


def test_status_and_list_as_text_and_json(server: ServerHandle, trained: tuple[str, Result]) -> None:
    run_id, _ = trained
    status = at(server, "status", run_id)
    assert status.code == 0
    for words in (run_id, "PPO", "CartPole-v1", "SUCCEEDED", "seed", "mean reward", "n_steps=128", "model"):
        assert words in status.out
    data = json.loads(at(server, "status", run_id, "--json").out)
    assert data["run_id"] == run_id and data["state"] == "SUCCEEDED" and data["seed"] == 5
    assert isinstance(data["timesteps_done"], int) and data["hyperparameters"]["n_steps"] == "128"

    listed = at(server, "list", "--experiment", "cli")
    assert listed.code == 0
    header = listed.out.splitlines()[0].split()
    assert header == ["RUN", "EXPERIMENT", "ALGO", "ENV", "STATE", "TRY", "TIMESTEPS", "REWARD", "CREATED"]
    assert run_id in listed.out and "SUCCEEDED" in listed.out
    rows = json.loads(at(server, "list", "--state", "succeeded", "--json").out)
    assert run_id in {r["run_id"] for r in rows} and {r["state"] for r in rows} == {"SUCCEEDED"}
    assert json.loads(at(server, "list", "--experiment", "cli", "--state", "FAILED", "--json").out) == []
    empty = at(server, "list", "--experiment", "nobody-uses-this")
    assert empty.code == 0 and not empty.out and "no runs match" in empty.err


def test_act_answers_as_the_trained_model(server: ServerHandle, trained: tuple[str, Result]) -> None:
    run_id, _ = trained
    model = PPO.load(server.status(run_id).model_path, device="cpu")
    obs = observations(3)
    expected, _ = model.predict(obs, deterministic=True)

    one = at(server, "act", run_id, "--obs", ",".join(str(float(x)) for x in obs[0]))
    assert one.code == 0 and one.out == f"action: {int(expected[0])}\n"
    assert "from the model at" in one.err
    many = at(server, "act", run_id, "--json", *[f"--obs={','.join(str(float(x)) for x in o)}" for o in obs])
    data = json.loads(many.out)
    assert data["actions"] == [[float(a)] for a in expected] and data["model_timesteps"] >= TIMESTEPS

    wrong = at(server, "act", run_id, "--obs", "0.1,0.2")
    assert wrong.code == 1 and wrong.err.startswith("ERROR INVALID_ARGUMENT: observation:"), wrong.err


def test_resume_follows_the_next_attempt_and_delete_removes_the_run(server: ServerHandle) -> None:
    run_id = at(server, "train", "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", "2048",
                "--hp", *FAST_HP, "--checkpoint-interval", "500", "--detach").out.strip()
    server.wait_until(run_id, lambda s: s.timesteps_done >= 600)
    assert at(server, "stop", run_id).code == 0
    resumed = at(server, "resume", run_id, "--timesteps", "2560")
    assert resumed.code == 0, resumed
    assert resumed.out.startswith(f"resumed {run_id} (attempt 2) at "), resumed.out
    assert re.search(r"SUCCEEDED\s+[\d,]+/2,560 steps", resumed.out) or f"SUCCEEDED {run_id}" in resumed.out
    status = at(server, "status", run_id)
    assert re.search(r"attempt\s+2 \(1: 0-[\d,]+ CANCELLED\)", status.text), status.text
    listed = at(server, "list", "--json")
    assert next(r for r in json.loads(listed.out) if r["run_id"] == run_id)["attempt"] == 2
    active = at(server, "delete", "run-doesnotexist")
    assert active.code == 1 and active.err.startswith("ERROR NOT_FOUND:")
    deleted = at(server, "delete", run_id)
    assert deleted.code == 0 and deleted.out == f"deleted {run_id}\n"
    assert at(server, "status", run_id).code == 1


def test_stop_cancels_a_running_run(server: ServerHandle) -> None:
    run_id = at(server, "train", "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", "5000000",
                "--hp", *FAST_HP, "--checkpoint-interval", "1000", "--detach").out.strip()
    server.wait_until(run_id, lambda s: s.timesteps_done > 0)
    stopped = at(server, "stop", run_id)
    assert stopped.code == 0 and stopped.out.startswith(f"CANCELLED {run_id} at "), stopped
    assert server.status(run_id).state == pb.CANCELLED
    again = at(server, "stop", run_id)
    assert again.code == 0 and again.out == f"{run_id} had already ended: CANCELLED\n"
    watched = at(server, "watch", run_id)
    assert watched.code == 1 and f"CANCELLED {run_id} at " in watched.err and "stopped on request" in watched.err


def test_health(server: ServerHandle) -> None:
    result = at(server, "health")
    assert result.code == 0 and result.out == f"{server.address}: SERVING\n"
    data = json.loads(at(server, "health", "--json").out)
    assert data == {"address": server.address, "service": "", "serving": True, "status": f"{server.address}: SERVING"}
    unknown = at(server, "health", "--service", "no.such.Service")
    assert unknown.code == 1 and "NOT_FOUND" in unknown.out


# ----------------------------------------------------------------------------------------------- plot


def test_plot_writes_a_learning_curve_png(server: ServerHandle, trained: tuple[str, Result], in_tmp: Path) -> None:
    run_id, _ = trained
    target = in_tmp / "curve.png"
    result = at(server, "plot", run_id, "-o", str(target))
    assert result.code == 0, result.err
    assert result.out.startswith(f"wrote {target}: learning curve of ")
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1000, 600)
    import matplotlib.image

    pixels = matplotlib.image.imread(target)
    assert pixels.shape[:2] == (600, 1000)
    assert float(pixels[..., :3].std()) > 0.05, "something is drawn, not a blank canvas"

    episodes = server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id)).total_episodes
    default = at(server, "plot", run_id, "--json")  # default path and window
    summary = json.loads(default.out)
    window = min(100, max(10, episodes // 10))
    assert summary == {"path": f"{run_id}.png", "episodes": episodes, "window": window, "width": 1000, "height": 600}
    assert (in_tmp / summary["path"]).is_file()


def test_plot_of_a_run_without_episodes_says_so(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=1_000_000)
    try:
        result = at(server, "plot", run_id)
        assert result.code == 1 and f"run {run_id} has no finished episodes recorded yet" in result.err
    finally:
        server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)


def test_run_history_rpc_pages_through_the_episodes(server: ServerHandle, trained: tuple[str, Result]) -> None:
    run_id, _ = trained
    recorded = json.loads((Path(server.status(run_id).model_path).parent / "history.json").read_text())["episodes"]
    full = server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id))
    assert full.run_id == run_id and full.total_episodes == len(recorded) == len(full.episodes) > 10
    assert [(e.reward, e.length, e.timesteps) for e in full.episodes] == \
        [(r["reward"], r["length"], r["timesteps"]) for r in recorded]
    page = server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id, offset=5, limit=3))
    assert page.offset == 5 and list(page.episodes) == list(full.episodes[5:8])
    past_end = server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id, offset=10**6))
    assert not past_end.episodes and past_end.total_episodes == len(recorded)
    for request, code in ((pb.RunHistoryRequest(run_id="run-000000000000"), grpc.StatusCode.NOT_FOUND),
                          (pb.RunHistoryRequest(run_id=run_id, offset=-1), grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.RunHistoryRequest(run_id=run_id, limit=-1), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as info:
            server.stub.GetRunHistory(request)
        assert info.value.code() == code


# ----------------------------------------------------------------------------------------------- export

TORCHSCRIPT_CHECK = """
import json, sys, torch
extra = {"rl_service.json": ""}
policy = torch.jit.load(sys.argv[1], _extra_files=extra)
actions = policy(torch.tensor(json.loads(sys.argv[2]), dtype=torch.float32))
single = policy(torch.tensor(json.loads(sys.argv[2])[:1], dtype=torch.float32))
print(json.dumps({"actions": actions.numpy().tolist(), "single": single.numpy().tolist(), "dtype": str(actions.dtype),
                  "metadata": json.loads(extra["rl_service.json"]),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("rl_service", "stable_baselines3"))}))
"""
SB3_CHECK = """
import json, sys, numpy as np
from stable_baselines3 import PPO
actions, _ = PPO.load(sys.argv[1], device="cpu").predict(np.asarray(json.loads(sys.argv[2]), dtype=np.float32),
                                                         deterministic=True)
print(json.dumps({"actions": actions.tolist(), "loaded": sorted(m for m in sys.modules if m.startswith("rl_service"))}))
"""
ONNX_CHECK = """
import json, sys, numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
obs = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
print(json.dumps({"actions": session.run(None, {"obs": obs})[0].tolist(),
                  "single": session.run(None, {"obs": obs[:1]})[0].tolist(),
                  "inputs": [i.name for i in session.get_inputs()], "outputs": [o.name for o in session.get_outputs()],
                  "metadata": json.loads(session.get_modelmeta().custom_metadata_map["rl_service.json"])}))
"""


def clean_python(code: str, *args: str) -> dict:  # type: ignore[type-arg]
    """Run code in an isolated interpreter (-I: no PYTHONPATH, no user site, not this directory) and parse its JSON."""
    result = subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True, text=True, timeout=120,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def act_batch(server: ServerHandle, run_id: str, obs: np.ndarray) -> list[float]:
    reply = server.stub.ActBatch(pb.ActBatchRequest(run_id=run_id, observations=obs.ravel().tolist(),
                                                    deterministic=True))
    return list(reply.actions)


def test_export_torchscript_loads_with_torch_alone_and_acts_as_act(server: ServerHandle, trained: tuple[str, Result],
                                                                   tmp_path: Path) -> None:
    run_id, _ = trained
    target = tmp_path / "policy.pt"
    result = at(server, "export", run_id, "--format", "torchscript", "-o", str(target))
    assert result.code == 0, result.err
    assert result.out.startswith(f"wrote {target}: torchscript, ")
    assert "signature: forward(obs: float32[batch, 4]) -> int64[batch]" in result.out and "torch.jit.load" in result.out
    obs = observations()
    loaded = clean_python(TORCHSCRIPT_CHECK, str(target), json.dumps(obs.tolist()))
    assert loaded["loaded"] == [], "loading needs torch only"
    assert loaded["dtype"] == "torch.int64"
    assert [float(a) for a in loaded["actions"]] == act_batch(server, run_id, obs)
    assert loaded["single"] == loaded["actions"][:1]
    assert loaded["metadata"]["run_id"] == run_id and loaded["metadata"]["algorithm"] == "PPO"
    assert loaded["metadata"]["model_timesteps"] == server.status(run_id).timesteps_done


def test_export_sb3_zip_loads_with_stable_baselines3(server: ServerHandle, trained: tuple[str, Result],
                                                     in_tmp: Path) -> None:
    run_id, _ = trained
    result = at(server, "export", run_id, "--format", "SB3", "--json")
    summary = json.loads(result.out)
    assert result.code == 0 and summary["path"] == f"{run_id}.zip" and summary["format"] == "sb3"
    saved = (in_tmp / summary["path"]).read_bytes()
    assert saved == Path(server.status(run_id).model_path).read_bytes() and summary["bytes"] == len(saved)
    obs = observations()
    loaded = clean_python(SB3_CHECK, str(in_tmp / summary["path"]), json.dumps(obs.tolist()))
    assert loaded["loaded"] == []
    assert [float(a) for a in loaded["actions"]] == act_batch(server, run_id, obs)


def test_export_onnx_runs_in_onnxruntime(server: ServerHandle, trained: tuple[str, Result], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    run_id, _ = trained
    target = tmp_path / "policy.onnx"
    result = at(server, "export", run_id, "--format", "onnx", "-o", str(target))
    if result.code == 1 and "FAILED_PRECONDITION" in result.err:
        pytest.skip(f"this server cannot export ONNX: {result.err}")
    assert result.code == 0, result.err
    obs = observations()
    loaded = clean_python(ONNX_CHECK, str(target), json.dumps(obs.tolist()))
    assert loaded["inputs"] == ["obs"] and loaded["outputs"] == ["action"]
    assert [float(a) for a in loaded["actions"]] == act_batch(server, run_id, obs)
    assert loaded["single"] == loaded["actions"][:1]
    assert loaded["metadata"]["run_id"] == run_id


def test_export_errors_map_to_status_codes(server: ServerHandle, trained: tuple[str, Result]) -> None:
    run_id, _ = trained
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ExportModel(pb.ExportModelRequest(run_id=run_id, format="tflite"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(word in info.value.details() for word in ("format", "tflite", "torchscript", "onnx", "sb3"))
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ExportModel(pb.ExportModelRequest(run_id="run-000000000000", format="sb3"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    waiting = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=1_000_000)
    try:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.ExportModel(pb.ExportModelRequest(run_id=waiting, format="torchscript"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "checkpoint" in info.value.details()
        result = at(server, "export", waiting, "--format", "sb3")
        assert result.code == 1 and result.err.startswith("ERROR FAILED_PRECONDITION: ")
    finally:
        server.stub.StopTraining(pb.RunRequest(run_id=waiting), timeout=60)


# ----------------------------------------------------------------------------------------------- bad input


def test_server_errors_print_code_and_message(server: ServerHandle) -> None:
    for argv in (("status", "run-nope"), ("watch", "run-nope"), ("stop", "run-nope"), ("plot", "run-nope"),
                 ("act", "run-nope", "--obs", "1,2,3,4")):
        result = at(server, *argv)
        assert result.code == 1, argv
        assert result.err == "ERROR NOT_FOUND: run_id: no run 'run-nope'\n", (argv, result.err)
        assert not result.out


def test_unreachable_server_is_one_line_and_exit_2_except_health() -> None:
    address = f"127.0.0.1:{closed_port()}"
    for argv in (("list",), ("status", "run-x"), ("train", "--algo", "PPO", "--env", "CartPole-v1",
                                                "--timesteps", "100")):
        result = cli(argv[0], "--address", address, *argv[1:])
        assert result.code == 2, argv
        assert result.err == f"cannot reach the server at {address}: connection refused\n", result.err
    # health is a probe: "not serving" is its answer (exit 1, as healthcheck.py), not a usage error.
    health = cli("health", "--address", address)
    assert health.code == 1 and not health.err
    assert health.out == f"cannot reach the server at {address}: connection refused (UNAVAILABLE)\n"


def test_a_token_is_ignored_by_a_server_without_tokens_and_tls_needs_a_tls_server(server: ServerHandle) -> None:
    # test_cli_security.py covers servers with AUTH_TOKENS_FILE and TLS.
    assert at(server, "list", "--token", "secret").code == 0
    tls = at(server, "list", "--tls", "--timeout", "5")
    assert tls.code == 2 and tls.err.startswith(f"cannot reach the server at {server.address}: ")


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["frobnicate"], ["list", "--frob"], ["train", "--env", "CartPole-v1"], ["act", "run-x"],
                 ["act", "run-x", "--obs", "a,b"], ["train", "--algo", "PPO", "--env", "E", "--timesteps", "0"],
                 ["train", "--algo", "PPO", "--env", "E", "--timesteps", "9", "--hp", "nokey"],
                 ["list", "--state", "DONE"], ["export", "run-x", "--format", "tflite"], []):
        assert run(argv) == 2, argv
        assert "usage: rl-service" in capsys.readouterr().err, argv
    assert run(["--help"]) == 0 and "train" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- real processes

needs_script = pytest.mark.skipif(not SCRIPT.exists(), reason="the rl-service console script is not installed")


def default_sigint() -> None:
    """In a child: take SIGINT's default action back. A test run started in the background (`cmd &` in a script)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler: Ctrl+C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "RL_SERVICE_", "COLUMNS"))}
    env.update(extra)
    return env


@needs_script
def test_installed_script_unreachable_and_unknown_subcommand() -> None:
    address = f"127.0.0.1:{closed_port()}"
    result = subprocess.run([str(SCRIPT), "list"], capture_output=True, text=True, timeout=60,
                            env=script_env(RL_SERVICE_ADDRESS=address))
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == f"cannot reach the server at {address}: connection refused\n"
    unknown = subprocess.run([str(SCRIPT), "frobnicate"], capture_output=True, text=True, timeout=60, env=script_env())
    assert unknown.returncode == 2 and unknown.stderr.startswith("usage: rl-service")
    assert "invalid choice: 'frobnicate'" in unknown.stderr and "Traceback" not in unknown.stderr


@needs_script
def test_serve_starts_a_server_that_the_other_commands_reach(tmp_path: Path) -> None:
    env = script_env(DATA_DIR=str(tmp_path / "data"), LOG_FORMAT="json", HTTP_PORT="0")
    server = subprocess.Popen([str(SCRIPT), "serve", "--host", "127.0.0.1", "--port", "0"], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            if '"server started"' in line:
                port = int(json.loads(line)["address"].rsplit(":", 1)[1])
        assert port, "the server logged 'server started'"
        health = subprocess.run([str(SCRIPT), "health", "--address", f"127.0.0.1:{port}"], capture_output=True,
                                text=True, timeout=60, env=env)
        assert health.returncode == 0 and health.stdout == f"127.0.0.1:{port}: SERVING\n"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0


@needs_script
def test_env_server_subcommand(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("rl_service.envserver") is None:
        result = subprocess.run([str(SCRIPT), "env-server", "--env", "CartPole-v1"], capture_output=True, text=True,
                                timeout=60, env=script_env())
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
        assert "rl_service.envserver" in result.stderr
        return
    process = subprocess.Popen([str(SCRIPT), "env-server", "--env", "CartPole-v1", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env())
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("serving CartPole-v1") and "grpc://127.0.0.1:" in first, first
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@needs_script
def test_ctrl_c_without_a_terminal_detaches_and_the_run_goes_on(server: ServerHandle) -> None:
    process = subprocess.Popen(
        [str(SCRIPT), "train", "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", "5000000", "--hp", *FAST_HP],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=script_env(RL_SERVICE_ADDRESS=server.address), preexec_fn=default_sigint)
    assert process.stdout is not None
    first = process.stdout.readline()
    match = RUN_ID.search(first)
    assert match, first
    run_id = match.group(0)
    try:
        server.wait_until(run_id, lambda s: s.timesteps_done > 0)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        assert f"detached from {run_id}; it keeps training" in out and "Traceback" not in err
        time.sleep(0.5)
        assert server.status(run_id).state == pb.RUNNING, "detaching leaves the run training"
    finally:
        if process.poll() is None:
            process.kill()
        server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)


@needs_script
def test_ctrl_c_in_a_terminal_asks_and_can_stop_the_run(server: ServerHandle) -> None:
    env = script_env(RL_SERVICE_ADDRESS=server.address, TERM="xterm-256color", COLUMNS="100")
    argv = [str(SCRIPT), "train", "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", "5000000", "--hp", *FAST_HP,
            "--checkpoint-interval", "1000"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty, so Ctrl+C typed there is SIGINT
        try:
            default_sigint()
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    screen = b""
    try:
        screen += read_until(fd, b"steps/s", 60)
        run_id = RUN_ID.search(screen.decode(errors="replace")).group(0)  # type: ignore[union-attr]
        server.wait_until(run_id, lambda s: s.timesteps_done > 0)
        os.write(fd, b"\x03")  # Ctrl+C
        screen += read_until(fd, b"stop the run [s] or detach [d]? ", 30)
        os.write(fd, b"s\n")
        screen += read_until(fd, None, 90)
        _, wait_status = os.waitpid(pid, 0)
        text = ANSI.sub("", screen.decode(errors="replace"))
        assert os.waitstatus_to_exitcode(wait_status) == 1, text
        assert f"stopping {run_id}" in text and f"CANCELLED {run_id} at " in text and "Traceback" not in text
        assert re.search(r"RUNNING\s+━", text), "the bar was drawn on the terminal"
        assert server.status(run_id).state == pb.CANCELLED
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def read_until(fd: int, needle: bytes | None, timeout: float) -> bytes:
    """Read the pty until `needle` shows up (None: until the child closes it)."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle is None or needle not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout}s for {needle!r}; screen: {data[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child exited and the pty closed
            chunk = b""
        if not chunk:
            if needle is None:
                return data
            raise AssertionError(f"the program ended before {needle!r}; screen: {data[-2000:]!r}")
        data += chunk
    return data
