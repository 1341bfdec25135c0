"""The client subcommands: each talks to a running server through the public gRPC API only."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from rich.text import Text

from rl_service.cli.client import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
    Client,
    CliError,
    server_error,
)
from rl_service.cli.formatting import (
    Output,
    format_duration,
    runs_table,
    state_name,
    status_table,
    status_to_dict,
)
from rl_service.cli.progress import RunProgress
from rl_service.cli.security import Security, SecurityFlagError
from rl_service_proto.v1 import training_pb2 as pb

STOP_TIMEOUT = 120.0  # StopTraining waits for the final checkpoint (STOP_TIMEOUT_SECONDS, 30 s by default)
EXPORT_TIMEOUT = 300.0  # tracing or ONNX export of a large policy takes a while
POLL_SECONDS = 1.0
USAGE_HINTS = {
    "torchscript": "torch.jit.load({path!r})(torch.as_tensor(observations, dtype=torch.float32))",
    "onnx": "onnxruntime.InferenceSession({path!r}).run(None, {{'obs': observations.astype('float32')}})[0]",
    "sb3": "{algorithm}.load({path!r}).predict(observations, deterministic=True)",
}


def security(args: argparse.Namespace) -> Security:
    """TLS and token from the flags (and $RL_SERVICE_TOKEN); an unusable one is a usage error (exit 2)."""
    try:
        return Security.from_args(args)
    except SecurityFlagError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@contextlib.contextmanager
def connected(args: argparse.Namespace) -> Iterator[Client]:
    """A client for --address, over TLS and with a token when asked (CliError exit 2 when nothing answers)."""
    client = Client.connect(args.address, args.timeout, security(args))
    try:
        yield client
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------- train / watch


def cmd_train(args: argparse.Namespace, output: Output) -> int:
    """Start a run, then follow it with a progress bar (or return at once with --detach)."""
    request = pb.StartTrainingRequest(
        algorithm=args.algo, env_id=args.env, total_timesteps=args.timesteps, experiment_id=args.experiment,
        hyperparameters=dict(args.hp), checkpoint_interval=args.checkpoint_interval,
        model_output_path=args.model_output)
    if args.seed is not None:
        request.seed = args.seed
    with connected(args) as client:
        run_id = client.call(client.training.StartTraining, request).run_id
        if args.detach:
            if args.json:
                output.json({"run_id": run_id})
            else:
                output.line(run_id)
            return EXIT_OK
        if not args.json:
            output.line(f"started {run_id}: {request.algorithm} on {request.env_id} for {request.total_timesteps:,} "
                        f"timesteps (experiment {request.experiment_id or 'default'}); Ctrl+C to stop or detach")
        return follow(client, run_id, output, args.json)


def cmd_resume(args: argparse.Namespace, output: Output) -> int:
    """Resume a finished run, then follow it as train does."""
    request = pb.ResumeTrainingRequest(run_id=args.run_id)
    if args.timesteps is not None:
        request.total_timesteps = args.timesteps
    with connected(args) as client:
        status = client.call(client.training.ResumeTraining, request)
        if args.detach:
            if args.json:
                output.json(status_to_dict(status))
            else:
                output.line(status.run_id)
            return EXIT_OK
        if not args.json:
            output.line(f"resumed {status.run_id} (attempt {status.attempt}) at {status.timesteps_done:,}/"
                        f"{status.total_timesteps:,} timesteps; Ctrl+C to stop or detach")
        return follow(client, status.run_id, output, args.json)


def cmd_delete(args: argparse.Namespace, output: Output) -> int:
    """Delete a finished run and its files."""
    with connected(args) as client:
        client.call(client.training.DeleteRun, pb.DeleteRunRequest(run_id=args.run_id))
    if args.json:
        output.json({"run_id": args.run_id, "deleted": True})
    else:
        output.line(f"deleted {args.run_id}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, output: Output) -> int:
    """Follow a run until it ends; exit 0 if it SUCCEEDED."""
    with connected(args) as client:
        return follow(client, args.run_id, output, args.json)


def follow(client: Client, run_id: str, output: Output, as_json: bool) -> int:
    """Show each status until the run ends; Ctrl+C asks whether to stop the run or detach from it."""
    try:
        final = _show_until_done(client, run_id, output, as_json)
    except KeyboardInterrupt:
        return _interrupted(client, run_id, output, as_json)
    return report_final(final, output, as_json)


def _show_until_done(client: Client, run_id: str, output: Output, as_json: bool) -> pb.TrainingStatus:
    last: pb.TrainingStatus | None = None
    with contextlib.ExitStack() as stack:
        progress = None if as_json else stack.enter_context(RunProgress(output.out))
        for status in _statuses(client, run_id, output):
            last = status
            if progress is None:
                output.json(status_to_dict(status), compact=True)
            else:
                progress.update(status)
    if last is None or not last.is_done:
        # The stream ends early only when the server shuts down; the status says what became of the run.
        last = client.call(client.training.GetTrainingStatus, pb.RunRequest(run_id=run_id))
        if not last.is_done:
            raise CliError(f"ERROR UNAVAILABLE: the server closed the watch while {run_id} is "
                           f"{state_name(last.state)}; follow it again with: rl-service watch {run_id}",
                           EXIT_SERVER_ERROR)
        if as_json:
            output.json(status_to_dict(last), compact=True)
    return last


def _statuses(client: Client, run_id: str, output: Output) -> Iterator[pb.TrainingStatus]:
    """WatchTraining's statuses; when the server's stream cap is reached, GetTrainingStatus once a second."""
    stream = client.training.WatchTraining(pb.RunRequest(run_id=run_id))
    try:
        yield from stream
        return
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise server_error(exc) from None
    finally:
        stream.cancel()
    output.note("all of the server's WatchTraining streams are in use; polling GetTrainingStatus instead")
    while True:
        status = client.call(client.training.GetTrainingStatus, pb.RunRequest(run_id=run_id))
        yield status
        if status.is_done:
            return
        time.sleep(POLL_SECONDS)


def ask_stop_or_detach(output: Output) -> str:
    """'stop' or 'detach'; without a terminal to ask on (or on a second Ctrl+C), 'detach'."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        return "detach"
    while True:
        try:
            answer = output.out.input(Text("stop the run [s] or detach [d]? ")).strip().lower()
        except (EOFError, KeyboardInterrupt):
            output.line("")
            return "detach"
        if answer in ("s", "stop"):
            return "stop"
        if answer in ("d", "detach"):
            return "detach"


def _interrupted(client: Client, run_id: str, output: Output, as_json: bool) -> int:
    if ask_stop_or_detach(output) == "stop":
        output.note(f"stopping {run_id}: it saves a final checkpoint and model first")
        final = client.call(client.training.StopTraining, pb.RunRequest(run_id=run_id), STOP_TIMEOUT)
        if as_json:
            output.json(status_to_dict(final), compact=True)
        return report_final(final, output, as_json)
    if as_json:
        output.json({"run_id": run_id, "detached": True}, compact=True)
    else:
        output.line(f"detached from {run_id}; it keeps training. Follow it again with: rl-service watch {run_id}")
    return EXIT_INTERRUPTED


def report_final(status: pb.TrainingStatus, output: Output, as_json: bool) -> int:
    """Say how the run ended (errors on stderr); 0 if it SUCCEEDED, 1 otherwise."""
    name = state_name(status.state)
    where = f"{status.timesteps_done:,}/{status.total_timesteps:,} timesteps"
    if status.state == pb.SUCCEEDED:
        if not as_json:
            metrics = status.metrics
            took = format_duration(status.finished_at - status.started_at) if status.started_at else "-"
            output.line(f"SUCCEEDED {status.run_id}: {status.timesteps_done:,} timesteps in {took}, mean reward "
                        f"{metrics.mean_episode_reward:.2f} over the last {min(metrics.episodes_completed, 100)} "
                        "episodes")
            output.line(f"model: {status.model_path}")
            output.line(f"next: rl-service plot {status.run_id}   |   "
                        f"rl-service export {status.run_id} --format torchscript")
        return EXIT_OK
    if status.state == pb.CANCELLED:
        saved = f"; model: {status.model_path}" if status.model_path else ""
        output.note(f"CANCELLED {status.run_id} at {where} (stopped on request){saved}")
    else:
        output.note(f"{name} {status.run_id} at {where}: {status.error or 'no error message'}")
    return EXIT_SERVER_ERROR


# ----------------------------------------------------------------------------------------------- inspect


def cmd_status(args: argparse.Namespace, output: Output) -> int:
    """Print one run's status."""
    with connected(args) as client:
        status = client.call(client.training.GetTrainingStatus, pb.RunRequest(run_id=args.run_id))
    if args.json:
        output.json(status_to_dict(status))
    else:
        output.table(status_table(status))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, output: Output) -> int:
    """Print the runs matching the filters, newest first."""
    request = pb.ListRunsRequest()
    if args.experiment is not None:
        request.experiment_id = args.experiment
    if args.state is not None:
        request.state = pb.RunState.Value(args.state)
    with connected(args) as client:
        runs = list(client.call(client.training.ListRuns, request).runs)
    if args.json:
        output.json([status_to_dict(r) for r in runs])
    elif runs:
        output.table(runs_table(runs))
    else:
        output.note("no runs match")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, output: Output) -> int:
    """Stop a run gracefully (it checkpoints first); a finished run is left as it is."""
    with connected(args) as client:
        before = client.call(client.training.GetTrainingStatus, pb.RunRequest(run_id=args.run_id))
        status = client.call(client.training.StopTraining, pb.RunRequest(run_id=args.run_id), STOP_TIMEOUT)
    if args.json:
        output.json(status_to_dict(status))
    elif before.is_done:
        output.line(f"{status.run_id} had already ended: {state_name(status.state)}")
    else:
        saved = f"; model: {status.model_path}" if status.model_path else ""
        output.line(f"{state_name(status.state)} {status.run_id} at {status.timesteps_done:,}/"
                    f"{status.total_timesteps:,} timesteps{saved}")
    return EXIT_OK


def cmd_act(args: argparse.Namespace, output: Output) -> int:
    """Ask the run's policy for actions: Act for one --obs, ActBatch for several."""
    observations: list[list[float]] = args.obs
    deterministic = not args.stochastic
    with connected(args) as client:
        if len(observations) == 1:
            reply = client.call(client.training.Act, pb.ActRequest(
                run_id=args.run_id, observation=observations[0], deterministic=deterministic))
            actions = [list(reply.action)]
        else:
            batch = client.call(client.training.ActBatch, pb.ActBatchRequest(
                run_id=args.run_id, observations=[x for obs in observations for x in obs],
                deterministic=deterministic))
            size = batch.action_size
            actions = [list(batch.actions[i * size:(i + 1) * size]) for i in range(batch.count)]
            reply = pb.ActResponse(model_timesteps=batch.model_timesteps)
    if args.json:
        data: dict[str, Any] = {"model_timesteps": reply.model_timesteps}
        if len(actions) == 1:
            data["action"] = actions[0]
        else:
            data["actions"] = actions
        output.json(data)
        return EXIT_OK
    for index, action in enumerate(actions):
        text = ", ".join(_number(v) for v in action)
        output.line(f"action: {text}" if len(actions) == 1 else f"observation {index}: action {text}")
    output.note(f"(from the model at {reply.model_timesteps:,} timesteps)")
    return EXIT_OK


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


# ----------------------------------------------------------------------------------------------- plot / export


def cmd_plot(args: argparse.Namespace, output: Output) -> int:
    """Draw the run's learning curve (reward, moving average, episode length over timesteps) into a PNG."""
    from rl_service.cli.plotting import DPI, HEIGHT_INCHES, WIDTH_INCHES, fetch_history, plot_learning_curve

    with connected(args) as client:
        status = client.call(client.training.GetTrainingStatus, pb.RunRequest(run_id=args.run_id))
        episodes = fetch_history(client, args.run_id)
    if not episodes:
        raise CliError(f"run {args.run_id} has no finished episodes recorded yet ({state_name(status.state)}; the "
                       "history is written at each checkpoint and at the end); try again later", EXIT_SERVER_ERROR)
    path = Path(args.output or f"{args.run_id}.png")
    title = (f"{status.run_id}: {status.algorithm} on {status.env_id} ({state_name(status.state)}, "
             f"{status.timesteps_done:,} timesteps)")
    window = args.window or min(100, max(10, len(episodes) // 10))
    plot_learning_curve(episodes, title, path, window)
    width, height = int(WIDTH_INCHES * DPI), int(HEIGHT_INCHES * DPI)
    if args.json:
        output.json({"path": str(path), "episodes": len(episodes), "window": window, "width": width,
                     "height": height})
    else:
        output.line(f"wrote {path}: learning curve of {len(episodes):,} episodes ({width}x{height} PNG)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, output: Output) -> int:
    """Export the run's policy through the API and write it to a file."""
    from rl_service.infra.atomic import atomic_write_bytes

    with connected(args) as client:
        status = client.call(client.training.GetTrainingStatus, pb.RunRequest(run_id=args.run_id))
        reply = client.call(client.training.ExportModel,
                            pb.ExportModelRequest(run_id=args.run_id, format=args.format), EXPORT_TIMEOUT)
    path = Path(args.output or reply.filename)
    atomic_write_bytes(path, reply.data)
    if args.json:
        output.json({"path": str(path), "format": reply.format, "bytes": len(reply.data),
                     "model_timesteps": reply.model_timesteps, "signature": reply.signature})
        return EXIT_OK
    output.line(f"wrote {path}: {reply.format}, {len(reply.data):,} bytes, model at {reply.model_timesteps:,} "
                "timesteps")
    output.line(f"signature: {reply.signature}")
    hint = USAGE_HINTS.get(reply.format)
    if hint:
        output.line("use: " + hint.format(path=str(path), algorithm=status.algorithm))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- health


def cmd_health(args: argparse.Namespace, output: Output) -> int:
    """The same probe as healthcheck.py: exit 0 when SERVING, 1 when not serving or unreachable; the line says why."""
    from rl_service.healthcheck_main import DEFAULT_TIMEOUT, probe

    # Health is open on every server: TLS applies, the token is not needed.
    report = probe(args.address, args.service, args.timeout or DEFAULT_TIMEOUT, security(args).credentials)
    if args.json:
        output.json({"address": report.address, "service": report.service, "serving": report.serving,
                     "status": report.text})
    else:
        output.line(report.text)
    return report.exit_code
