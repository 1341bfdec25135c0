"""Named policies trained from client-collected experience: the core of PolicyService.

A client creates a policy under its own id, sends batches of (state, action, reward, done), and each batch that
completes at least one episode runs one REINFORCE update. Every accepted change bumps the version by one, is
saved atomically (so policies survive a restart at their last accepted state) and wakes the subscribers of
WatchModelUpdates, who always read the newest version and so never hold training up.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from rl_service.core.algorithms import ACTIVATIONS
from rl_service.core.errors import (
    AlreadyExists,
    CapacityExceeded,
    CheckpointNotFound,
    InvalidRequest,
    PolicyNotFound,
    VersionConflict,
)
from rl_service.core.experience import SpaceShape, Transitions, split_episodes, validate_batch
from rl_service.core.hyperparams import HyperValue, Param, format_value, merge
from rl_service.core.policy_export import state_dict_bytes, torchscript_bytes, weights_from_safetensors
from rl_service.core.policy_networks import PolicyNet, action_distribution, build_policy_net
from rl_service.core.ports import PolicyStore
from rl_service.core.reinforce import UpdateStats, reinforce_update

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STATE_FORMAT = "rl_service.named_policy.v1"
MAX_OBSERVATION_SIZE = 1_000_000
MAX_ACTION_SIZE = 10_000
MAX_SEED = 2**32 - 1

NAMED_POLICY_SCHEMA = merge((
    Param("learning_rate", "float", 1e-3, 0.0, 1.0, low_exclusive=True, help="Adam step size"),
    Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor of the Monte-Carlo returns"),
    Param("beta", "float", 0.1, 0.0, 10.0, help="entropy bonus weight"),
    Param("net_arch", "net_arch", (64, 64), help="hidden layer widths"),
    Param("activation_fn", "choice", "tanh", choices=("tanh", "relu"), help="hidden layer activation"),
    Param("max_grad_norm", "float", None, 0.0, 1e6, low_exclusive=True, optional=True,
          help="gradient clipping norm (none: no clipping)"),
    Param("log_std_init", "float", 0.0, -20.0, 2.0, help="initial log standard deviation (Box actions)"),
))


def check_name(value: str, field_name: str) -> str:
    """A policy id or checkpoint name that is safe as a file name; InvalidRequest otherwise."""
    if not NAME_RE.fullmatch(value) or value in (".", ".."):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidRequest(
            f"{field_name}: {shown!r} is not a safe name; use 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit", field=field_name)
    return value


@dataclass(frozen=True)
class PolicySpecRequest:
    """A client's spec, before validation."""

    observation_shape: tuple[int, ...]
    discrete_actions: int | None = None
    box_shape: tuple[int, ...] = ()
    box_low: tuple[float, ...] = ()
    box_high: tuple[float, ...] = ()
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    seed: int | None = None


@dataclass(frozen=True)
class PolicySpec:
    """A validated spec with effective hyperparameters (defaults filled in) and the seed used."""

    observation_shape: tuple[int, ...]
    discrete_actions: int | None
    action_shape: tuple[int, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    hyperparameters: Mapping[str, str]
    seed: int

    @property
    def shape(self) -> SpaceShape:
        """Sizes and bounds for batch validation."""
        size = int(np.prod(self.action_shape)) if self.discrete_actions is None else 1
        low = np.asarray(self.action_low, dtype=np.float64) if self.action_low else np.full(size, -np.inf)
        high = np.asarray(self.action_high, dtype=np.float64) if self.action_high else np.full(size, np.inf)
        return SpaceShape(int(np.prod(self.observation_shape)), self.discrete_actions, size, low, high)

    def values(self) -> dict[str, HyperValue]:
        """The hyperparameters parsed back into typed values."""
        return NAMED_POLICY_SCHEMA.parse(self.hyperparameters)

    def to_json(self) -> str:
        """Canonical JSON (also the identity compared by idempotent creation)."""
        data = asdict(self)
        data["hyperparameters"] = dict(sorted(self.hyperparameters.items()))
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PolicySpec:
        """The inverse of to_json."""
        data = json.loads(text)
        return cls(tuple(data["observation_shape"]), data["discrete_actions"], tuple(data["action_shape"]),
                   tuple(data["action_low"]), tuple(data["action_high"]), dict(data["hyperparameters"]),
                   int(data["seed"]))


def build_spec(request: PolicySpecRequest) -> PolicySpec:
    """Validate a client's spec; InvalidRequest names the field at fault."""
    obs_shape = tuple(int(d) for d in request.observation_shape)
    if not obs_shape or any(d < 1 for d in obs_shape) or int(np.prod(obs_shape)) > MAX_OBSERVATION_SIZE:
        raise InvalidRequest(f"spec.observation_shape: {list(obs_shape)} must be non-empty positive dimensions "
                             f"of at most {MAX_OBSERVATION_SIZE} values in all", field="spec.observation_shape")
    if request.discrete_actions is not None:
        if not 2 <= request.discrete_actions <= MAX_ACTION_SIZE:
            raise InvalidRequest(f"spec.discrete_n: {request.discrete_actions} must be in [2, {MAX_ACTION_SIZE}]",
                                 field="spec.discrete_n")
        action_shape: tuple[int, ...] = ()
        low: tuple[float, ...] = ()
        high: tuple[float, ...] = ()
    else:
        action_shape = tuple(int(d) for d in request.box_shape)
        if not action_shape or any(d < 1 for d in action_shape) or int(np.prod(action_shape)) > MAX_ACTION_SIZE:
            raise InvalidRequest("spec: give discrete_n, or box with a non-empty positive shape "
                                 f"of at most {MAX_ACTION_SIZE} values", field="spec.box.shape")
        size = int(np.prod(action_shape))
        low, high = tuple(float(v) for v in request.box_low), tuple(float(v) for v in request.box_high)
        for name, bound in (("low", low), ("high", high)):
            if bound and (len(bound) != size or any(np.isnan(bound))):
                raise InvalidRequest(f"spec.box.{name}: {len(bound)} values, expected {size} (or none for "
                                     "unbounded), without NaN", field=f"spec.box.{name}")
        if low and high and any(lo > hi for lo, hi in zip(low, high, strict=True)):
            raise InvalidRequest("spec.box: every low must be <= its high", field="spec.box.low")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise InvalidRequest(f"spec.seed: must be in [0, {MAX_SEED}]", field="spec.seed")
    values = NAMED_POLICY_SCHEMA.parse(request.hyperparameters)
    effective = {key: format_value(value) for key, value in sorted(values.items())}
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
    return PolicySpec(obs_shape, request.discrete_actions, action_shape, low, high, effective, seed)


@dataclass(frozen=True)
class PolicyConfig:
    """Limits for named policies."""

    versions_kept: int = 4  # recent versions whose weights ComputeLogProb can still use
    max_pending_steps: int = 1_000_000  # transitions an unfinished episode may hold between batches


@dataclass(frozen=True)
class PolicySnapshot:
    """A policy's public state (PolicyInfo)."""

    policy_id: str
    spec: PolicySpec
    version: int
    pending_steps: int
    episodes_trained: int
    steps_trained: int
    last_update: UpdateStats | None
    created_at: float
    updated_at: float
    created: bool = False


@dataclass(frozen=True)
class BatchOutcome:
    """What SendTrainingBatch did."""

    policy_id: str
    version: int
    updated: bool
    metrics: UpdateStats | None
    pending_steps: int
    torchscript: bytes = b""


@dataclass(frozen=True)
class ModelUpdate:
    """One WatchModelUpdates message."""

    policy_id: str
    version: int
    metrics: UpdateStats | None
    torchscript: bytes = b""


@dataclass(frozen=True)
class CheckpointInfo:
    """A named checkpoint."""

    name: str
    version: int
    saved_at: float


class _Policy:
    """One policy's mutable state; every access holds `lock`."""

    def __init__(self, policy_id: str, spec: PolicySpec, net: PolicyNet, created_at: float) -> None:
        self.policy_id = policy_id
        self.spec = spec
        self.shape = spec.shape
        self.values = spec.values()
        self.net = net
        self.optimizer = self.new_optimizer()
        self.version = 0
        self.tail = Transitions.empty(self.shape)
        self.episodes_trained = 0
        self.steps_trained = 0
        self.last_update: UpdateStats | None = None
        self.created_at = created_at
        self.updated_at = created_at
        self.revision = 0  # changes on every state change, including a checkpoint load that lowers the version
        self.deleted = False
        self.recent: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.torchscript: tuple[int, bytes] | None = None
        self.lock = threading.Lock()

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh Adam over the network's parameters."""
        return torch.optim.Adam(self.net.parameters(), lr=float(self.values["learning_rate"]))  # type: ignore[arg-type]

    def snapshot(self, created: bool = False) -> PolicySnapshot:
        """The public view."""
        return PolicySnapshot(self.policy_id, self.spec, self.version, len(self.tail), self.episodes_trained,
                              self.steps_trained, self.last_update, self.created_at, self.updated_at, created)

    def torchscript_now(self) -> bytes:
        """TorchScript of the current weights, cached per revision."""
        if self.torchscript is None or self.torchscript[0] != self.revision:
            self.torchscript = (self.revision, torchscript_bytes(self.net))
        return self.torchscript[1]

    def remember_version(self, keep: int) -> None:
        """Keep the current weights under the current version for ComputeLogProb."""
        self.recent[self.version] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        while len(self.recent) > keep:
            self.recent.popitem(last=False)


def _new_net(spec: PolicySpec) -> PolicyNet:
    values = spec.values()
    action_space = _action_space(spec)
    # A private RNG stream: the seed fixes the initial weights without touching the process's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = build_policy_net(spec.shape.observation_size, action_space, values["net_arch"],  # type: ignore[arg-type]
                               ACTIVATIONS[str(values["activation_fn"])], float(values["log_std_init"]))  # type: ignore[arg-type]
    return net


def _action_space(spec: PolicySpec) -> Any:
    import gymnasium as gym

    if spec.discrete_actions is not None:
        return gym.spaces.Discrete(spec.discrete_actions)
    return gym.spaces.Box(-np.inf, np.inf, shape=spec.action_shape, dtype=np.float32)


class PolicyManager:
    """All named policies of this server."""

    def __init__(self, store: PolicyStore, config: PolicyConfig, logger: Any) -> None:
        self._store = store
        self._config = config
        self._log = logger
        self._policies: dict[str, _Policy] = {}
        self._lock = threading.Lock()  # guards the dict; each policy has its own lock for its state
        self._changed = threading.Condition()
        self._closed = False
        for policy_id in store.policy_ids():
            try:
                tensors, metadata = store.load_state(policy_id)
                self._policies[policy_id] = _restore(policy_id, tensors, metadata, config.versions_kept)
            except Exception as exc:  # one unreadable file must not keep the server (or other policies) down
                self._log.error("cannot load named policy; skipped", policy_id=policy_id, error=str(exc))

    # ----------------------------------------------------------------- lifecycle

    def create(self, policy_id: str, request: PolicySpecRequest, initial_weights: bytes = b"") -> PolicySnapshot:
        """Create a policy; the same spec again is a no-op, a different one ALREADY_EXISTS."""
        check_name(policy_id, "policy_id")
        spec = build_spec(request)
        with self._lock:
            existing = self._policies.get(policy_id)
            if existing is not None:
                with existing.lock:
                    wanted = spec if request.seed is not None else _with_seed(spec, existing.spec.seed)
                    if wanted.to_json() == existing.spec.to_json() and not initial_weights:
                        return existing.snapshot(created=False)
                raise AlreadyExists(f"policy_id: {policy_id!r} already exists with a different spec (or initial "
                                    "weights were given); delete it first or choose another id", field="policy_id")
            policy = _Policy(policy_id, spec, _new_net(spec), time.time())
            if initial_weights:
                policy.net.load_state_dict(weights_from_safetensors(initial_weights, policy.net, "initial_weights"))
            policy.remember_version(self._config.versions_kept)
            self._persist(policy)  # on disk before anyone can see it
            self._policies[policy_id] = policy
        self._log.info("policy created", policy_id=policy_id, observation_shape=list(spec.observation_shape),
                       discrete_actions=spec.discrete_actions)
        return policy.snapshot(created=True)

    def get(self, policy_id: str) -> PolicySnapshot:
        """One policy's state."""
        policy = self._get(policy_id)
        with policy.lock:
            return policy.snapshot()

    def list_policies(self) -> list[PolicySnapshot]:
        """Every policy, by id."""
        with self._lock:
            policies = sorted(self._policies.values(), key=lambda p: p.policy_id)
        snapshots = []
        for policy in policies:
            with policy.lock:
                snapshots.append(policy.snapshot())
        return snapshots

    def delete(self, policy_id: str) -> None:
        """Remove a policy, its files and checkpoints; its watchers' streams end."""
        policy = self._get(policy_id)
        with self._lock:  # lock order everywhere: the dict's lock, then a policy's
            with policy.lock:
                self._check_live(policy, None)
                policy.deleted = True
                self._store.delete(policy_id)
            self._policies.pop(policy_id, None)
        self._notify()
        self._log.info("policy deleted", policy_id=policy_id)

    # ----------------------------------------------------------------- training

    def send_batch(self, policy_id: str, states: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                   dones: np.ndarray, expected_version: int | None = None, flush: bool = False,
                   return_model: bool = False) -> BatchOutcome:
        """Validate, join to the held tail, split into episodes, update once; nothing changes on any error."""
        policy = self._get(policy_id)
        batch = validate_batch(policy.shape, states, actions, rewards, dones)
        with policy.lock:
            self._check_live(policy, expected_version)
            joined = policy.tail.concat(batch) if len(policy.tail) else batch
            episodes, tail = split_episodes(joined)
            if len(tail) > self._config.max_pending_steps:
                raise CapacityExceeded(
                    f"dones: the unfinished episode would hold {len(tail)} transitions, over the limit of "
                    f"{self._config.max_pending_steps}; end episodes with done=true", field="dones")
            if not episodes:
                if flush:
                    raise InvalidRequest(
                        f"dones: flush was asked but the batch (after {len(policy.tail)} held transitions) "
                        "completes no episode; mark the episode's last transition done", field="dones")
                with self._rollback_on_error(policy):
                    # The model did not change: no new revision, so subscribers are not told of it again.
                    policy.tail = tail
                    policy.updated_at = time.time()
                    self._persist(policy)
                return BatchOutcome(policy_id, policy.version, False, None, len(tail))
            with self._rollback_on_error(policy):
                stats = reinforce_update(policy.net, policy.optimizer, episodes, float(policy.values["gamma"]),  # type: ignore[arg-type]
                                         float(policy.values["beta"]), _optional_float(policy.values["max_grad_norm"]))  # type: ignore[arg-type]
                policy.tail = tail
                policy.episodes_trained += stats.episodes
                policy.steps_trained += stats.steps
                policy.last_update = stats
                self._commit(policy, new_version=True)
            outcome = BatchOutcome(policy_id, policy.version, True, stats, len(tail),
                                   policy.torchscript_now() if return_model else b"")
        self._notify()
        return outcome

    def set_weights(self, policy_id: str, data: bytes, expected_version: int | None = None) -> PolicySnapshot:
        """Replace the weights with a safetensors state dict (the optimizer restarts); version + 1."""
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, expected_version)
            weights = weights_from_safetensors(data, policy.net, "safetensors")
            with self._rollback_on_error(policy):
                policy.net.load_state_dict(weights)
                policy.optimizer = policy.new_optimizer()
                self._commit(policy, new_version=True)
            snapshot = policy.snapshot()
        self._notify()
        return snapshot

    # ----------------------------------------------------------------- reading the policy

    def log_prob(self, policy_id: str, states: np.ndarray, actions: np.ndarray, version: int | None = None,
                 checkpoint: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Log-probabilities and entropies of actions in states, under the current, a kept or a saved version."""
        policy = self._get(policy_id)
        shape = policy.shape
        count = actions.size // shape.action_size if actions.size % shape.action_size == 0 else -1
        if count < 1:
            raise InvalidRequest(f"actions: {actions.size} values is not a whole number of actions of size "
                                 f"{shape.action_size}", field="actions")
        batch = validate_batch(shape, states, actions, np.zeros(count), np.zeros(count, dtype=bool))
        with policy.lock:
            self._check_live(policy, None)
            if checkpoint is not None:
                tensors, metadata = self._checkpoint(policy, checkpoint)
                net, used = _new_net(policy.spec), int(metadata["version"])
                net.load_state_dict(_net_weights(tensors))
            elif version is not None and version != policy.version:
                if version not in policy.recent:
                    raise CheckpointNotFound(
                        f"version: {version} is not kept; kept versions are {sorted(policy.recent)}", field="version")
                net, used = _new_net(policy.spec), version
                net.load_state_dict(policy.recent[version])
            else:
                # The current version: evaluate the live network under the lock rather than copy it.
                return (*_log_probs(policy.net, batch), policy.version)
        return (*_log_probs(net, batch), used)

    def model(self, policy_id: str, torchscript: bool) -> tuple[int, bytes]:
        """The current version as TorchScript or as a safetensors state dict."""
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, None)
            return policy.version, policy.torchscript_now() if torchscript else state_dict_bytes(policy.net)

    def watch(self, policy_id: str, from_version: int, include_model: bool, is_active: Callable[[], bool],
              poll_seconds: float = 0.5) -> Iterator[ModelUpdate]:
        """Versions after `from_version`: the newest at once if already newer, then each change as it lands."""
        policy = self._get(policy_id)
        with policy.lock:
            seen = policy.revision
            first = self._update_message(policy, include_model) if policy.version > from_version else None
        if first is not None:
            yield first
        while True:
            with self._changed:
                self._changed.wait_for(functools.partial(self._watch_wakes, policy, seen), timeout=poll_seconds)
            if not is_active() or policy.deleted or self._closed:
                return
            with policy.lock:
                if policy.revision == seen:
                    continue
                seen = policy.revision
                message = self._update_message(policy, include_model)
            yield message

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self, policy_id: str, name: str) -> CheckpointInfo:
        """Save weights, optimizer state, version and the held tail under a name (replacing one of that name)."""
        check_name(name, "name")
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, None)
            tensors, metadata = _encode(policy)
            self._store.save_checkpoint(policy_id, name, tensors, metadata)
            return CheckpointInfo(name, policy.version, float(metadata["saved_at"]))

    def load_checkpoint(self, policy_id: str, name: str) -> PolicySnapshot:
        """Restore a named checkpoint: weights, optimizer, version and held tail."""
        check_name(name, "name")
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, None)
            tensors, metadata = self._checkpoint(policy, name)
            with self._rollback_on_error(policy):
                _apply_state(policy, tensors, metadata)
                self._commit(policy, new_version=False)  # the checkpoint's own version is restored
            snapshot = policy.snapshot()
        self._notify()
        return snapshot

    def list_checkpoints(self, policy_id: str) -> list[CheckpointInfo]:
        """The policy's named checkpoints."""
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, None)
            return [CheckpointInfo(name, int(meta.get("version", 0)), float(meta.get("saved_at", 0.0)))
                    for name, meta in self._store.checkpoints(policy_id)]

    def close(self) -> None:
        """End every watch stream."""
        self._closed = True
        self._notify()

    # ----------------------------------------------------------------- internals

    def _get(self, policy_id: str) -> _Policy:
        if not policy_id:
            raise InvalidRequest("policy_id is required", field="policy_id")
        with self._lock:
            policy = self._policies.get(policy_id)
        if policy is None:
            check_name(policy_id, "policy_id")
            raise PolicyNotFound(f"policy_id: no policy {policy_id!r}", field="policy_id")
        return policy

    def _watch_wakes(self, policy: _Policy, seen: int) -> bool:
        return policy.revision != seen or policy.deleted or self._closed

    def _check_live(self, policy: _Policy, expected_version: int | None) -> None:
        if policy.deleted:
            raise PolicyNotFound(f"policy_id: policy {policy.policy_id!r} was deleted", field="policy_id")
        if expected_version is not None and expected_version != policy.version:
            raise VersionConflict(f"expected_version: policy {policy.policy_id!r} is at version {policy.version}, "
                                  f"not {expected_version}", field="expected_version")

    def _checkpoint(self, policy: _Policy, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        found = self._store.load_checkpoint(policy.policy_id, name)
        if found is None:
            raise CheckpointNotFound(f"checkpoint: policy {policy.policy_id!r} has no checkpoint {name!r}",
                                     field="checkpoint")
        return found

    def _commit(self, policy: _Policy, new_version: bool) -> None:
        """Record a state change: a new revision (and version), its weights kept for ComputeLogProb, saved."""
        if new_version:
            policy.version += 1
        policy.revision += 1
        policy.updated_at = time.time()
        policy.remember_version(self._config.versions_kept)
        self._persist(policy)

    def _persist(self, policy: _Policy) -> None:
        tensors, metadata = _encode(policy)
        self._store.save_state(policy.policy_id, tensors, metadata)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _update_message(self, policy: _Policy, include_model: bool) -> ModelUpdate:
        return ModelUpdate(policy.policy_id, policy.version, policy.last_update,
                           policy.torchscript_now() if include_model else b"")

    class _Rollback:
        """Restores a policy's full state if the block raises (a failed save must not leave memory ahead of disk)."""

        def __init__(self, policy: _Policy) -> None:
            self.policy = policy
            tensors, self.metadata = _encode(policy)
            # state_dict() tensors share storage with the live parameters, which the update changes in place.
            self.tensors = {key: value.clone() for key, value in tensors.items()}
            self.revision = policy.revision
            self.updated_at = policy.updated_at
            self.recent = OrderedDict(policy.recent)

        def __enter__(self) -> None:
            return None

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if exc_type is not None:
                _apply_state(self.policy, self.tensors, self.metadata)
                self.policy.revision = self.revision
                self.policy.updated_at = self.updated_at
                self.policy.recent = self.recent

    def _rollback_on_error(self, policy: _Policy) -> PolicyManager._Rollback:
        return PolicyManager._Rollback(policy)


def _log_probs(net: PolicyNet, batch: Transitions) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of the batch's actions and the policy's entropies in its states."""
    with torch.no_grad():
        distribution = action_distribution(net, torch.as_tensor(batch.states))
        return (distribution.log_prob(torch.as_tensor(batch.actions)).numpy(),
                distribution.entropy().numpy())


def _net_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's state dict out of an encoded policy state (keys "net.<name>")."""
    return {key[len("net."):]: value for key, value in tensors.items() if key.startswith("net.")}


def _with_seed(spec: PolicySpec, seed: int) -> PolicySpec:
    return PolicySpec(spec.observation_shape, spec.discrete_actions, spec.action_shape, spec.action_low,
                      spec.action_high, spec.hyperparameters, seed)


def _optional_float(value: HyperValue) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _encode(policy: _Policy) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The policy's whole state as tensors plus string metadata (the safetensors layout; no pickle)."""
    tensors: dict[str, torch.Tensor] = {f"net.{k}": v for k, v in policy.net.state_dict().items()}
    optimizer = policy.optimizer.state_dict()
    for index, slots in optimizer["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tail = policy.tail
    tensors["tail.states"] = torch.as_tensor(tail.states)
    tensors["tail.actions"] = torch.as_tensor(tail.actions)
    tensors["tail.rewards"] = torch.as_tensor(tail.rewards)
    tensors["tail.dones"] = torch.as_tensor(tail.dones)
    metadata = {
        "format": STATE_FORMAT,
        "policy_id": policy.policy_id,
        "spec": policy.spec.to_json(),
        "version": str(policy.version),
        "episodes_trained": str(policy.episodes_trained),
        "steps_trained": str(policy.steps_trained),
        "created_at": repr(policy.created_at),
        "updated_at": repr(policy.updated_at),
        "saved_at": repr(time.time()),
        "last_update": json.dumps(asdict(policy.last_update)) if policy.last_update else "",
        "optimizer_param_groups": json.dumps(optimizer["param_groups"]),
    }
    return tensors, metadata


def _apply_state(policy: _Policy, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Load an encoded state into a policy of the same spec."""
    policy.net.load_state_dict(_net_weights(tensors))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer = policy.new_optimizer()
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["optimizer_param_groups"])})
    policy.optimizer = optimizer
    policy.tail = Transitions(tensors["tail.states"].numpy().copy(), tensors["tail.actions"].numpy().copy(),
                              tensors["tail.rewards"].numpy().copy(), tensors["tail.dones"].numpy().copy())
    policy.version = int(metadata["version"])
    policy.episodes_trained = int(metadata["episodes_trained"])
    policy.steps_trained = int(metadata["steps_trained"])
    last = metadata.get("last_update", "")
    policy.last_update = UpdateStats(**json.loads(last)) if last else None


def _restore(policy_id: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
             versions_kept: int) -> _Policy:
    """A policy from its saved state."""
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(f"unknown state format {metadata.get('format')!r}")
    spec = PolicySpec.from_json(metadata["spec"])
    policy = _Policy(policy_id, spec, _new_net(spec), float(metadata["created_at"]))
    _apply_state(policy, tensors, metadata)
    policy.updated_at = float(metadata["updated_at"])
    policy.remember_version(versions_kept)
    return policy

