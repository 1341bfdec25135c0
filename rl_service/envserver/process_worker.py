"""One env-worker process of a ProcessBatch: an EnvBatch of a contiguous block of the server's envs, stepped on
request over a pipe (messages in process_wire.py).

It dies with its server (process_lifeline.arm_worker: the server's end of a pipe closes when the server ends,
SIGKILL included), ignores SIGINT (Ctrl-C reaches the whole process group; the server decides when its workers
stop) and exits on CLOSE or when the server closes its end of the pipe.
"""

from __future__ import annotations

import importlib
import signal
from functools import partial
from multiprocessing.connection import Connection

from rl_service.envserver import process_wire as wire
from rl_service.envserver.step_cost import make_costly
from rl_service.infra.external_env.env_batch import EnvBatch, ResetNeeded
from rl_service.infra.process_lifeline import arm_worker


def run_worker(env_id: str, first: int, count: int, cost_us: float, modules: tuple[str, ...],
               conn: Connection) -> None:
    """Process target: build envs first..first+count-1 of `env_id`, say READY, then answer requests until CLOSE."""
    arm_worker()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for module in modules:  # the server's --gym-packages: this process starts fresh (spawn)
            importlib.import_module(module)
        batch = EnvBatch.from_gym_id(env_id, count, make=partial(make_costly, cost_us=cost_us))
    except Exception as exc:
        conn.send_bytes(wire.failure(wire.FAILED, f"{type(exc).__name__}: {exc}"))
        return
    try:
        conn.send_bytes(wire.ready_answer(batch.serves_action_masks, batch.num_envs))
        serve(batch, first, wire.Layout.of(batch.observation_space, batch.action_space), conn)
    finally:
        batch.close()


def serve(batch: EnvBatch, first: int, layout: wire.Layout, conn: Connection) -> None:
    """Answer RESET and STEP requests, one at a time, until CLOSE or the end of the pipe."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not data or data[0] == wire.CLOSE:
            return
        conn.send_bytes(answer(batch, first, layout, data))


def answer(batch: EnvBatch, first: int, layout: wire.Layout, data: bytes) -> bytes:
    """The answer to one request: EnvBatch's results, or the error's text as the reference server reports it."""
    try:
        if data[0] == wire.RESET:
            seed = wire.read_reset(data)
            # The server's env i is seeded with seed + i; this worker's env j is the server's env first + j.
            observations = batch.reset(None if seed is None else seed + first)
            return wire.reset_answer(layout, observations, batch.last_action_masks)
        if data[0] == wire.STEP:
            env_ids, actions = wire.read_step(layout, data)
            return wire.step_answer(layout, batch.step(actions, env_ids))
        raise wire.WireError(f"unknown request {data[0]}")
    except ResetNeeded as exc:
        return wire.failure(wire.RESET_NEEDED, str(exc))
    except Exception as exc:
        return wire.failure(wire.FAILED, f"{type(exc).__name__}: {exc}")
