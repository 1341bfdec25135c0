"""ProcessBatch: the server's envs spread over worker processes, with EnvBatch's semantics (env-server --processes).

Env i lives in worker i * P // num_envs: contiguous blocks whose sizes differ by at most one env. Each worker holds
an EnvBatch of its block (process_worker.py). A Reset or Step goes to every worker it concerns at once and their
answers are merged in request order, so the answers are exactly those of one EnvBatch of all the envs: env i
seeded with seed + i, auto-resets, final observations of the ended envs in row order, masks, ResetNeeded before
the first Reset and after a failed step (kept here, for the whole batch, as EnvBatch keeps it).

A worker runs one request at a time; start_reset/start_step wait until every worker they concern is idle, then
send and return a Pending at once, so requests on different workers run at the same time. A worker's answer is
received by whichever thread needs it first (result() of its request, or a request waiting for that worker), with
no thread of its own: on two cores every hand-over between threads costs more than the step it carries. The last
part of a request to arrive merges it, updates the batch's state and frees its workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from rl_service.envserver import process_wire as wire
from rl_service.envserver.process_worker import run_worker
from rl_service.envserver.step_cost import make_costly
from rl_service.infra.external_env.codec import AnySpace, EnvSpec
from rl_service.infra.external_env.env_batch import BatchStep, ResetNeeded, action_masks_method, check_env_ids

MAX_PLANS = 256  # step plans (which rows go to which worker) kept per distinct env_ids
START_TIMEOUT_SECONDS = 120.0  # a worker builds its envs within this (imports included)
CLOSE_TIMEOUT_SECONDS = 5.0  # then it is killed
# EnvBatch's words, so a refusal reads the same with one process or several.
RESET_NEEDED = "Reset is required before Step (at start, and after a step that failed)"


class StepFailed(RuntimeError):
    """An env raised in a worker; str() is "<ExceptionType>: <message>", as the server reports it."""


class WorkerGone(RuntimeError):
    """A worker process ended (crashed or killed), or the batch is closing: no more steps are possible."""


class Pending:
    """One Reset or Step sent to some workers; result() waits for their answers, merged."""

    def __init__(self, batch: ProcessBatch, kind: int, env_ids: np.ndarray, parts: dict[int, np.ndarray]) -> None:
        self._batch = batch
        self.kind = kind
        self.env_ids = env_ids  # the env of each row of the request
        self.parts = parts  # worker -> the rows of the request it answers, in order
        self.rows = len(env_ids)
        self.answers: dict[int, bytes] = {}
        self._done = threading.Event()
        self._finishing = threading.Lock()  # a lost worker and the last answer may both try to finish it
        self._value: Any = None
        self._error: Exception | None = None

    def result(self) -> Any:
        """The merged answer: observations and masks for a Reset, a BatchStep for a Step; raises what failed."""
        for w in self.parts:
            self._batch._collect(w)
        self._done.wait()  # another thread may be merging it
        if self._error is not None:
            raise self._error
        return self._value

    def _finish(self, value: Any, error: Exception | None) -> None:
        with self._finishing:
            if not self._done.is_set():
                self._value, self._error = value, error
                self._done.set()


class ProcessBatch:
    """num_envs envs of a Gymnasium id over `processes` worker processes; EnvBatch's interface and answers."""

    def __init__(self, env_id: str, num_envs: int, processes: int, cost_us: float = 0.0,
                 modules: Sequence[str] = (), version: str = "") -> None:
        if not 1 <= processes <= num_envs:
            raise ValueError(f"processes must be in 1..{num_envs} (one env at least per process), not {processes}")
        probe = make_costly(env_id, cost_us)  # an unknown id fails here, before any process starts
        try:
            self.has_masks_method = action_masks_method(probe) is not None
            self.spec = EnvSpec(probe.observation_space, probe.action_space, num_envs, env_id, version)
        finally:
            probe.close()
        self.layout = wire.Layout.of(self.observation_space, self.action_space)
        self.worker_of = np.array([i * processes // num_envs for i in range(num_envs)], dtype=np.int64)
        self.first = [int(np.searchsorted(self.worker_of, w)) for w in range(processes)]
        self.local_id = np.arange(num_envs, dtype=np.int64) - np.array(self.first)[self.worker_of]
        self.needs_reset = True
        self.last_action_masks: np.ndarray | None = None
        self._cond = threading.Condition()
        self._in_flight: list[Pending | None] = [None] * processes
        self._receiving = [threading.Lock() for _ in range(processes)]  # one reader of a worker's pipe at a time
        self._plans: dict[tuple[int, ...] | None, tuple[np.ndarray, dict[int, np.ndarray], dict[int, bytes]]] = {}
        self._gone: str | None = None
        self._closing = False
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the gRPC threads is forked
        self._conns: list[Any] = []
        self._processes: list[Any] = []
        try:
            for w in range(processes):
                ours, theirs = context.Pipe(duplex=True)
                count = int(np.count_nonzero(self.worker_of == w))
                process = context.Process(target=run_worker, name=f"env-worker-{w}", daemon=True,
                                          args=(env_id, self.first[w], count, float(cost_us), tuple(modules), theirs))
                process.start()
                theirs.close()
                self._conns.append(ours)
                self._processes.append(process)
            self.serves_action_masks = all([self._await_ready(w) for w in range(processes)])
        except BaseException:
            for conn in self._conns:
                conn.close()  # the workers that started see the end of their pipe and exit
            self._stop_processes()
            raise

    # ------------------------------------------------------------------------------------ EnvBatch's interface

    @property
    def num_envs(self) -> int:
        """How many envs step together."""
        return int(self.spec.num_envs)

    @property
    def processes(self) -> int:
        """How many worker processes hold them."""
        return len(self._processes)

    @property
    def observation_space(self) -> AnySpace:
        """Every env's observation space."""
        return self.spec.observation_space

    @property
    def action_space(self) -> AnySpace:
        """Every env's action space."""
        return self.spec.action_space

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start a new episode in every env (env i seeded with seed + i); the first observations."""
        pending = self.start_reset(seed)
        assert pending is not None
        observations, _ = pending.result()
        return observations  # type: ignore[no-any-return]

    def step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> BatchStep:
        """Step every env (or those in env_ids, answered in that order), as EnvBatch.step."""
        pending = self.start_step(actions, env_ids)
        assert pending is not None
        return pending.result()  # type: ignore[no-any-return]

    # ------------------------------------------------------------------------------------ dispatch

    def start_reset(self, seed: int | None, abandon: threading.Event | None = None) -> Pending | None:
        """Send a Reset to every worker once all are idle; None if `abandon` was set meanwhile."""
        parts = {w: np.flatnonzero(self.worker_of == w) for w in range(self.processes)}
        messages = {w: wire.reset_request(seed) for w in parts}
        return self._send(Pending(self, wire.RESET, np.arange(self.num_envs), parts), messages, abandon)

    def start_step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None,
                   abandon: threading.Event | None = None) -> Pending | None:
        """Send each concerned worker its envs' actions once those workers are idle; None if `abandon` was set
        meanwhile. ResetNeeded (nothing sent) while a Reset is due."""
        ids, parts, prefixes = self._plan(None if env_ids is None else tuple(
            check_env_ids(env_ids, self.num_envs, len(actions))))
        messages = {w: prefixes[w] + wire.action_bytes(self.layout, actions if len(parts) == 1 else actions[rows])
                    for w, rows in parts.items()}
        return self._send(Pending(self, wire.STEP, ids, parts), messages, abandon)

    def _plan(self, env_ids: tuple[int, ...] | None
              ) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, bytes]]:
        """The envs of each row, each worker's rows, and the start of its STEP message (kept: a trainer repeats
        the same env_ids every step)."""
        plan = self._plans.get(env_ids)
        if plan is None:
            ids = np.arange(self.num_envs) if env_ids is None else np.array(env_ids, dtype=np.int64)
            owners = self.worker_of[ids]
            parts = {int(w): np.flatnonzero(owners == w) for w in np.unique(owners)}
            plan = ids, parts, {w: wire.step_prefix(self.local_id[ids[rows]]) for w, rows in parts.items()}
            if len(self._plans) < MAX_PLANS:
                self._plans[env_ids] = plan
        return plan

    def wake(self) -> None:
        """Wake the callers waiting for idle workers (to notice that their `abandon` was set)."""
        with self._cond:
            self._cond.notify_all()

    def _send(self, pending: Pending, messages: dict[int, bytes], abandon: threading.Event | None) -> Pending | None:
        while True:
            with self._cond:
                if self._gone is not None:
                    raise WorkerGone(self._gone)
                if abandon is not None and abandon.is_set():
                    return None
                busy = [(w, p) for w in messages if (p := self._in_flight[w]) is not None]
                if not busy:
                    self._dispatch(pending, messages)
                    return pending
                unanswered = [w for w, p in busy if w not in p.answers]
                if not unanswered:
                    self._cond.wait()  # answered; another thread is merging: it notifies
                    continue
            for w in unanswered:  # receive what an earlier request left there (its caller may be gone)
                self._collect(w)

    def _dispatch(self, pending: Pending, messages: dict[int, bytes]) -> None:
        """Send (under the lock, every worker concerned being idle)."""
        if pending.kind == wire.RESET:
            self.needs_reset = True  # until every env has reset
        elif self.needs_reset:
            raise ResetNeeded(RESET_NEEDED)
        for w, message in messages.items():
            self._in_flight[w] = pending
            with contextlib.suppress(OSError):  # the worker is gone: receiving its answer reports it
                self._conns[w].send_bytes(message)

    # ------------------------------------------------------------------------------------ answers

    def _collect(self, w: int) -> None:
        """Receive worker w's answer to the request in flight there, unless there is none or it came already."""
        with self._receiving[w]:
            with self._cond:
                pending = self._in_flight[w]
            if pending is None or w in pending.answers:
                return
            try:
                data = self._conns[w].recv_bytes()
            except (EOFError, OSError):
                self._lost(w)
                return
            with self._cond:
                pending.answers[w] = data
                complete = len(pending.answers) == len(pending.parts)
        if complete:
            self._complete(pending)

    def _complete(self, pending: Pending) -> None:
        """Merge a request's answers, update the batch's state, free its workers, then wake its caller."""
        value: Any = None
        error: Exception | None = None
        try:
            value = self._merge(pending)
        except Exception as exc:  # StepFailed, ResetNeeded, WireError: the caller gets it, the thread goes on
            error = exc
        with self._cond:
            if error is not None:
                self.needs_reset = True  # as EnvBatch: a failed step or reset leaves envs half-done
            elif pending.kind == wire.RESET:
                self.needs_reset = False
                self.last_action_masks = value[1]
            elif value.action_masks is not None and self.last_action_masks is not None:
                updated = self.last_action_masks.copy()  # a new array: callers may hold the old one
                updated[pending.env_ids] = value.action_masks
                self.last_action_masks = updated
            for w in pending.parts:
                if self._in_flight[w] is pending:
                    self._in_flight[w] = None
            self._cond.notify_all()
        pending._finish(value, error)

    def _merge(self, pending: Pending) -> Any:
        """The answers of every part, in request order; the first failure (in request order) raised."""
        order = sorted(pending.parts, key=lambda w: int(pending.parts[w][0]))
        for w in order:
            status, text = wire.status_of(pending.answers[w])
            if status == wire.RESET_NEEDED:
                raise ResetNeeded(text)
            if status != wire.OK:
                raise StepFailed(text)
        if pending.kind == wire.RESET:
            answers = [wire.read_reset_answer(self.layout, pending.answers[w], len(pending.parts[w])) for w in order]
            masks = [m for _, m in answers]
            return (np.concatenate([o for o, _ in answers]),
                    None if any(m is None for m in masks) else np.concatenate(masks))  # type: ignore[arg-type]
        return self._merge_steps(pending, order)

    def _merge_steps(self, pending: Pending, order: list[int]) -> BatchStep:
        n, layout = pending.rows, self.layout
        steps = {w: wire.read_step_answer(layout, pending.answers[w], len(pending.parts[w])) for w in order}
        if len(steps) == 1:
            return steps[order[0]]  # one worker: its rows are the request's, in order
        observations = np.empty((n, *layout.observation_shape), dtype=layout.observation_dtype.newbyteorder("="))
        rewards = np.empty(n, dtype=np.float32)
        terminated = np.empty(n, dtype=bool)
        truncated = np.empty(n, dtype=bool)
        masks = None if any(s.action_masks is None for s in steps.values()) else np.empty((n, layout.mask_width),
                                                                                         dtype=bool)
        for w, step in steps.items():
            rows = pending.parts[w]
            observations[rows], rewards[rows] = step.observations, step.rewards
            terminated[rows], truncated[rows] = step.terminated, step.truncated
            if masks is not None:
                masks[rows] = step.action_masks
        ended = np.flatnonzero(terminated | truncated)
        finals = np.empty((len(ended), *layout.observation_shape), dtype=observations.dtype)
        for w, step in steps.items():
            # A worker's final observations are in its rows' order, which is the request's order.
            finals[np.searchsorted(ended, pending.parts[w][step.ended])] = step.final_observations
        return BatchStep(observations, rewards, terminated, truncated, finals, masks)

    # ------------------------------------------------------------------------------------ start and end

    def _await_ready(self, w: int) -> bool:
        """Wait for worker w's READY; whether its envs serve action masks. RuntimeError if it cannot start."""
        conn, where = self._conns[w], self._describe(w)
        try:
            if not conn.poll(START_TIMEOUT_SECONDS):
                raise RuntimeError(f"{where} did not start within {START_TIMEOUT_SECONDS:g} s")
            data = conn.recv_bytes()
        except (EOFError, OSError):
            self._processes[w].join(CLOSE_TIMEOUT_SECONDS)
            raise RuntimeError(f"{where} ended while starting (exit code {self._processes[w].exitcode})") from None
        status, text = wire.status_of(data)
        if status != wire.OK:
            raise RuntimeError(f"{where} cannot create its envs: {text}")
        serves_masks, count = wire.read_ready(data)
        if count != int(np.count_nonzero(self.worker_of == w)):
            raise RuntimeError(f"{where} built {count} envs")
        return serves_masks

    def _describe(self, w: int) -> str:
        envs = np.flatnonzero(self.worker_of == w)
        return f"env worker {w} (envs {envs[0]}..{envs[-1]}, pid {self._processes[w].pid})"

    def _lost(self, w: int) -> None:
        """Worker w's pipe ended: fail its request in flight, and every later one."""
        with self._cond:
            closing = self._closing
        if not closing:
            self._processes[w].join(1.0)  # for its exit code
        message = ("the env workers are stopping" if closing else
                   f"{self._describe(w)} ended (exit code {self._processes[w].exitcode}); restart the env-server")
        with self._cond:
            if self._gone is None:
                self._gone = message
            self.needs_reset = True
            pending = self._in_flight[w]
            self._in_flight[w] = None
            self._cond.notify_all()
        if pending is not None:
            pending._finish(None, WorkerGone(message))

    def close(self) -> None:
        """Stop the workers (each closes its envs) and wait for them; a worker that does not end is killed."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send_bytes(wire.close_request())
        self._stop_processes()
        for conn in self._conns:
            conn.close()

    def _stop_processes(self) -> None:
        for process in self._processes:
            process.join(CLOSE_TIMEOUT_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
