"""env-server --processes: a server whose envs live in worker processes answers every request exactly as a
one-process server (unary and pipelined on the Session, subsets in any order, masks, refusals, env failures),
passes the compliance suite, runs pipelined group steps on different workers at the same time, its workers
end with it (SIGKILL included), and --cpus keeps all of it on the CPUs named."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rl_service.envserver import cli
from rl_service.envserver.compliance import EnvironmentServiceCompliance
from rl_service.envserver.process_batch import ProcessBatch
from rl_service.envserver.reference_server import EnvServerHandle, serve_gym
from rl_service.infra.external_env.codec import encode_batch
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc
from tests.support.envs import CRASH_ENV_ID, MASKED_ENV_ID
from tests.support.rendezvous_env import DIR_VARIABLE, RENDEZVOUS_ENV_ID, SECONDS_VARIABLE
from tests.unit.test_lifeline import descendants, linux_only, reaped, wait_all_dead

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ("tests.support.envs", "tests.support.rendezvous_env")


@dataclass
class Served:
    """A running reference server and a stub on it."""

    handle: EnvServerHandle
    channel: grpc.Channel
    stub: pb_grpc.EnvironmentServiceStub

    def stop(self) -> None:
        self.channel.close()
        self.handle.stop()


def serve(env_id: str, num_envs: int, processes: int, tmp_path: Path | None = None) -> Served:
    path = None if tmp_path is None else tmp_path / f"sim-{processes}.sock"
    handle = serve_gym(env_id, num_envs, processes=processes, modules=SUPPORT, unix_socket=path)
    channel = grpc.insecure_channel(handle.address.replace("grpc://", ""))
    return Served(handle, channel, pb_grpc.EnvironmentServiceStub(channel))


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Served, Served]]:
    """The same env served by one process and by several: (env_id, num_envs, processes) from the test's param."""
    env_id, num_envs, processes = request.param
    one = serve(env_id, num_envs, 1)
    try:
        several = serve(env_id, num_envs, processes)
    except BaseException:
        one.stop()
        raise
    assert isinstance(several.handle.servicer.batch, ProcessBatch)
    yield one, several
    one.stop()
    several.stop()


def outcome(call: Callable[[], Any]) -> Any:
    """The answer, or the refusal's (code, details)."""
    try:
        return call()
    except grpc.RpcError as error:
        return (error.code(), error.details())


def same(pair: tuple[Served, Served], call: Callable[[pb_grpc.EnvironmentServiceStub], Any]) -> Any:
    """Make the same call on both servers; assert the same answer (or the same refusal) and return it."""
    one, several = (outcome(partial(call, served.stub)) for served in pair)
    assert one == several
    return one


def step_request(actions: np.ndarray, space: Any, env_ids: list[int] | None = None) -> pb.StepRequest:
    return pb.StepRequest(actions=encode_batch(actions, space), env_ids=env_ids or [])


def unary_step(actions: np.ndarray, space: Any, env_ids: list[int] | None = None
               ) -> Callable[[pb_grpc.EnvironmentServiceStub], pb.StepResponse]:
    """A Step call, to make on both servers."""
    request = step_request(actions, space, env_ids)
    return lambda stub: stub.Step(request, timeout=30)


def random_plan(rng: np.random.Generator, num_envs: int, steps: int) -> list[list[int] | None]:
    """Whole steps and subsets of the envs in any order, mixed."""
    plan: list[list[int] | None] = []
    for _ in range(steps):
        if rng.random() < 0.3:
            plan.append(None)
        else:
            size = int(rng.integers(1, num_envs + 1))
            plan.append([int(i) for i in rng.permutation(num_envs)[:size]])
    return plan


@pytest.mark.parametrize("pair", [("CartPole-v1", 5, 2), ("CartPole-v1", 7, 3), (MASKED_ENV_ID, 4, 2)],
                         indirect=True, ids=["cartpole-5-over-2", "cartpole-7-over-3", "masked-4-over-2"])
def test_unary_answers_are_those_of_one_process(pair: tuple[Served, Served]) -> None:
    batch = pair[1].handle.servicer.batch
    space, n = batch.action_space, batch.num_envs
    refused = same(pair, unary_step(np.zeros(n, dtype=np.int64), space))
    assert refused[0] == grpc.StatusCode.FAILED_PRECONDITION
    same(pair, lambda s: s.Reset(pb.ResetRequest(seed=11), timeout=30))
    rng = np.random.default_rng(3)
    ended = masks = 0
    for env_ids in random_plan(rng, n, 120):
        actions = rng.integers(0, space.n, size=n if env_ids is None else len(env_ids))
        answer = same(pair, unary_step(actions, space, env_ids))
        ended += sum(answer.terminated) + sum(answer.truncated)
        masks += len(answer.action_masks.legal)
    assert ended > 5, "episodes ended, so final observations were compared"
    assert (masks > 0) == (batch.serves_action_masks is True)
    for bad in ([0, 0], [n], [1]):  # twice, out of range, fewer ids than actions
        refusal = same(pair, unary_step(np.zeros(2, dtype=np.int64), space, bad))
        assert refusal[0] == grpc.StatusCode.INVALID_ARGUMENT
    same(pair, unary_step(np.ones(n, dtype=np.int64), space))  # nothing changed
    same(pair, lambda s: s.Reset(pb.ResetRequest(seed=2**40), timeout=30))
    same(pair, unary_step(np.ones(n, dtype=np.int64), space, list(range(n))[::-1]))


def session(stub: pb_grpc.EnvironmentServiceStub, requests: list[pb.SessionRequest]) -> tuple[list[Any], Any]:
    """Every request sent at once (pipelined); the answers, and how the stream ended (None: OK)."""
    answers: list[Any] = []
    try:
        for answer in stub.Session(iter(requests), timeout=60):
            answers.append(answer)
    except grpc.RpcError as error:
        return answers, (error.code(), error.details())
    return answers, None


@pytest.mark.parametrize("pair", [("CartPole-v1", 8, 2)], indirect=True)
def test_pipelined_session_answers_are_those_of_one_process_and_a_refusal_ends_it_in_order(
        pair: tuple[Served, Served]) -> None:
    space = pair[1].handle.servicer.batch.action_space
    rng = np.random.default_rng(5)
    requests = [pb.SessionRequest(reset=pb.ResetRequest(seed=3))]
    for _ in range(60):  # two groups, as env_groups sends them, then a whole step and a subset across workers
        for group in ([0, 1, 2, 3], [4, 5, 6, 7]):
            requests.append(pb.SessionRequest(step=step_request(rng.integers(0, 2, 4), space, group)))
    requests.append(pb.SessionRequest(step=step_request(rng.integers(0, 2, 8), space)))
    requests.append(pb.SessionRequest(step=step_request(rng.integers(0, 2, 3), space, [6, 1, 4])))
    one, several = (session(served.stub, requests) for served in pair)
    assert one == several and one[1] is None and len(one[0]) == len(requests)
    assert sum(sum(a.step.terminated) for a in one[0][1:]) > 5

    bad = [pb.SessionRequest(step=step_request(np.zeros(4, dtype=np.int64), space, [4, 5, 6, 7])),
           pb.SessionRequest(step=step_request(np.zeros(4, dtype=np.int64), space, [0, 1, 2, 3])),
           pb.SessionRequest(step=step_request(np.zeros(2, dtype=np.int64), space, [3, 3])),
           pb.SessionRequest(step=step_request(np.zeros(8, dtype=np.int64), space))]  # never started
    one, several = (session(served.stub, bad) for served in pair)
    assert one == several and len(one[0]) == 2
    assert one[1] == (grpc.StatusCode.INVALID_ARGUMENT, "env_ids: env 3 is named twice; each env may be stepped "
                                                        "once per request")
    same(pair, unary_step(np.ones(8, dtype=np.int64), space))


@pytest.mark.parametrize("pair", [(CRASH_ENV_ID, 4, 2)], indirect=True)
def test_env_failures_and_their_refusals_are_those_of_one_process(pair: tuple[Served, Served]) -> None:
    space = pair[1].handle.servicer.batch.action_space
    same(pair, lambda s: s.Reset(pb.ResetRequest(seed=1), timeout=30))
    for _ in range(100):  # 300 steps per env, then every env raises
        same(pair, unary_step(np.ones(3, dtype=np.int64), space, [3, 0, 1]))
    for _ in range(200):
        same(pair, unary_step(np.ones(2, dtype=np.int64), space, [2, 3]))
    failed = same(pair, unary_step(np.ones(4, dtype=np.int64), space, [2, 1, 0, 3]))
    assert failed == (grpc.StatusCode.INTERNAL, "step failed: RuntimeError: CrashAfterEnv: deliberate crash after "
                                                "300 steps; Reset is required")
    refused = same(pair, unary_step(np.ones(1, dtype=np.int64), space, [3]))
    assert refused[0] == grpc.StatusCode.FAILED_PRECONDITION, "a Reset is due for every env, whichever worker failed"
    same(pair, lambda s: s.Reset(pb.ResetRequest(seed=1), timeout=30))
    requests = [pb.SessionRequest(step=step_request(np.ones(2, dtype=np.int64), space, ids))
                for ids in ([0, 1], [2, 3])]
    answers, ended = same(pair, lambda s: session(s, requests))
    assert len(answers) == 1 and ended == failed, "the answer before the failure, then the unary call's status"


@linux_only
def test_pipelined_group_steps_on_different_workers_run_at_the_same_time(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv(SECONDS_VARIABLE, "60")  # how long a wrong server would make this test wait, not a goal
    served = serve(RENDEZVOUS_ENV_ID, 4, 2)
    try:
        space = served.handle.servicer.batch.action_space
        answers, ended = session(served.stub, [
            pb.SessionRequest(reset=pb.ResetRequest(seed=0)),
            pb.SessionRequest(step=step_request(np.zeros(2, dtype=np.int64), space, [0, 1])),
            pb.SessionRequest(step=step_request(np.zeros(2, dtype=np.int64), space, [2, 3]))])
        assert ended is None
        seen = [list(a.step.observations.float32.values) for a in answers[1:]]
        assert seen == [[1.0, 1.0], [1.0, 1.0]], "each worker met the other one stepping"
    finally:
        served.stop()
    # The control: one request after the other, the first waits in vain (a short wait, then 0.0).
    (tmp_path / "control").mkdir()
    monkeypatch.setenv(DIR_VARIABLE, str(tmp_path / "control"))
    monkeypatch.setenv(SECONDS_VARIABLE, "0.5")
    control = serve(RENDEZVOUS_ENV_ID, 4, 2)  # its workers read the new variables
    try:
        control.stub.Reset(pb.ResetRequest(seed=0), timeout=60)
        steps = [control.stub.Step(step_request(np.zeros(2, dtype=np.int64), space, ids), timeout=60)
                 for ids in ([0, 1], [2, 3])]
        assert [list(s.observations.float32.values) for s in steps] == [[0.0, 0.0], [1.0, 1.0]]
    finally:
        control.stop()


class _TwoProcessServer:
    """Serves `env_id` from two worker processes for the compliance class."""

    __test__ = False
    env_id = "CartPole-v1"
    num_envs = 4
    on_unix_socket = False
    address = ""
    socket_dir: Path
    handles: list[EnvServerHandle]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _serve(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        cls.socket_dir = tmp_path_factory.mktemp("socks")
        cls.handles = []
        cls.address = cls._start()
        yield
        for started in cls.handles:
            started.stop()

    @classmethod
    def _start(cls) -> str:
        path = cls.socket_dir / f"sim{len(cls.handles)}.sock" if cls.on_unix_socket else None
        handle = serve_gym(cls.env_id, cls.num_envs, processes=2, modules=SUPPORT, unix_socket=path)
        cls.handles.append(handle)
        return handle.address

    def fresh_address(self) -> str | None:
        return self._start()


class TestCartPoleTwoProcessesCompliance(_TwoProcessServer, EnvironmentServiceCompliance):
    __test__ = True


class TestMaskedThreeEnvsOverTwoProcessesUnixCompliance(_TwoProcessServer, EnvironmentServiceCompliance):
    """Masks, blocks of unequal size (envs 0-1 and 2), a unix socket."""

    __test__ = True
    env_id = MASKED_ENV_ID
    num_envs = 3
    on_unix_socket = True


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-envs", "2", "--processes", "3"], "--processes must be in 1..2"),
    (["--num-envs", "2", "--processes", "0"], "--processes must be in 1..2"),
])
def test_bad_process_counts_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--env", "CartPole-v1", "--port", "0", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def start_cli_server(*extra: str) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen([sys.executable, "-m", "rl_service.envserver", "--env", "CartPole-v1", "--num-envs",
                               "4", "--processes", "2", *extra], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith("serving CartPole-v1 (4 envs) on "), line
    return server, line.rsplit(" on ", 1)[1].strip()


@linux_only
def test_the_workers_end_with_a_killed_server() -> None:
    server, _ = start_cli_server("--port", "0")
    family = descendants(server.pid)
    with reaped(family | {server.pid}):
        assert len(family) >= 2, f"two workers: {family}"
        server.send_signal(signal.SIGKILL)
        server.wait()
        survivors, seconds = wait_all_dead(family, timeout=20)
        assert not survivors, f"alive {seconds:.2f}s after the server's SIGKILL: {survivors}"


@linux_only
def test_sigterm_stops_the_server_and_its_workers(tmp_path: Path) -> None:
    path = tmp_path / "sim.sock"
    server, address = start_cli_server("--unix", str(path))
    family = descendants(server.pid)
    with reaped(family | {server.pid}):
        check = subprocess.run([sys.executable, "-m", "rl_service.envserver.compliance", address],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        survivors, _ = wait_all_dead(family, timeout=20)
        assert not survivors and not path.exists()


def thread_cpus(pid: int) -> set[str]:
    """The distinct CPU lists of every thread of process `pid` (Cpus_allowed_list in /proc)."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    lists.add(line.split(":", 1)[1].strip())
    return lists


@linux_only
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one to pin to, one left out")
def test_cpus_pins_the_server_and_its_workers_and_a_bad_list_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    last = max(os.sched_getaffinity(0))
    server, address = start_cli_server("--port", "0", "--cpus", str(last))
    family = descendants(server.pid)
    with reaped(family | {server.pid}):
        assert len(family) >= 2, f"two workers: {family}"
        for pid in family | {server.pid}:
            assert thread_cpus(pid) == {str(last)}, f"process {pid}'s threads are not all on CPU {last}"
        channel = grpc.insecure_channel(address.replace("grpc://", ""))
        try:  # it still serves
            spec = pb_grpc.EnvironmentServiceStub(channel).GetSpec(pb.GetSpecRequest(), timeout=30)
        finally:
            channel.close()
        assert spec.num_envs == 4
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    for bad, message in (("4000", "--cpus: CPU 4000 is not one this process may run on"),
                         ("1-0", "--cpus: '1-0': a range runs from the lower CPU to the higher")):
        with pytest.raises(SystemExit) as info:
            cli.main(["--env", "CartPole-v1", "--port", "0", "--cpus", bad])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
