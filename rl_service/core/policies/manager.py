"""Named policies trained from client-collected experience: the core of PolicyService.

A client creates a policy under its own id, sends batches of (state, action, reward, done), and each batch that
completes at least one episode runs one REINFORCE update; for a PPO policy every batch runs one PPO update, on all
of its transitions (nothing is held: see updates.py). Every accepted change bumps the version by one, is
saved atomically (before the reply, or write-behind by the PolicyWriter: see writer.py) and wakes the subscribers
of WatchModelUpdates, who always read the newest version and so never hold training up. Creating, deleting,
setting weights and loading a checkpoint are on disk before they return in either sync mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from rl_service.core.algorithms.reinforce_update import UpdateStats
from rl_service.core.errors import (
    AlreadyExists,
    CapacityExceeded,
    CheckpointNotFound,
    InvalidRequest,
    PolicyNotFound,
    VersionConflict,
    quoted,
)
from rl_service.core.models.policy_exporters import state_dict_bytes, weights_from_safetensors
from rl_service.core.policies.experience import validate_batch
from rl_service.core.policies.live_policy import LivePolicy, split_weights
from rl_service.core.policies.ports import PolicyStore
from rl_service.core.policies.ppo_batch import check_log_probs, check_truncated
from rl_service.core.policies.records import BatchOutcome, CheckpointInfo, ModelUpdate, PolicyConfig, PolicySnapshot
from rl_service.core.policies.spec import (
    PolicySpecRequest,
    build_spec,
    check_name,
    check_network_sizes,
    new_critic,
    new_net,
    with_seed,
)
from rl_service.core.policies.state_codec import (
    apply_state,
    critic_weights,
    encode,
    encode_snapshot,
    net_weights,
    restore,
)
from rl_service.core.policies.transactions import Rollback
from rl_service.core.policies.updates import (
    BatchSteps,
    log_probs_of,
    ppo_batch_update,
    reinforce_batch,
    values_of,
)
from rl_service.core.policies.writer import PolicyWriter, StateSnapshot
from rl_service.core.watching import ChangeFeed


class PolicyManager:
    """All named policies of this server."""

    def __init__(self, store: PolicyStore, config: PolicyConfig, logger: Any) -> None:
        self._store = store
        self._config = config
        self._log = logger
        self._policies: dict[str, LivePolicy] = {}
        self._lock = threading.Lock()  # guards the dict; each policy has its own lock for its state
        self._feed = ChangeFeed()  # a revision per policy id, bumped after each change is accepted
        self._writer = PolicyWriter(store, config.sync, config.sync_interval_seconds, self._snapshot, logger)
        for policy_id in store.policy_ids():
            try:
                tensors, metadata = store.load_state(policy_id)
                policy = restore(policy_id, tensors, metadata, config.versions_kept)
                self._policies[policy_id] = policy
                self._writer.track(policy_id, policy.change, policy.version)
                self._feed.bump(policy_id)
            except Exception as exc:  # one unreadable file must not keep the server (or other policies) down
                self._log.error("cannot load named policy; skipped", policy_id=policy_id, error=str(exc))

    # ----------------------------------------------------------------- lifecycle

    def create(self, policy_id: str, request: PolicySpecRequest, initial_weights: bytes = b"",
               owner: str = "") -> PolicySnapshot:
        """Create a policy owned by `owner` (the caller's token name); the same spec again is a no-op (the owner
        stays), a different one ALREADY_EXISTS."""
        check_name(policy_id, "policy_id")
        spec = build_spec(request)
        check_network_sizes(spec, self._config.max_network_parameters)  # before anything is built
        with self._lock:
            existing = self._policies.get(policy_id)
            if existing is not None:
                with existing.lock:
                    wanted = spec if request.seed is not None else with_seed(spec, existing.spec.seed)
                    if wanted.to_json() == existing.spec.to_json() and not initial_weights:
                        return existing.snapshot(self._writer.durable_version(policy_id), created=False)
                raise AlreadyExists(f"policy_id: {policy_id!r} already exists with a different spec (or initial "
                                    "weights were given); delete it first or choose another id", field="policy_id")
            if len(self._policies) >= self._config.max_policies:
                raise CapacityExceeded(f"policy_id: this server holds {len(self._policies)} named policies, its cap "
                                       f"(MAX_POLICIES={self._config.max_policies}); delete one first",
                                       field="policy_id")
            policy = LivePolicy(policy_id, spec, new_net(spec), time.time(), new_critic(spec), owner)
            if initial_weights:
                policy.net.load_state_dict(weights_from_safetensors(initial_weights, policy.net, "initial_weights"))
            policy.remember_version(self._config.versions_kept)
            self._writer.track(policy_id)
            self._persist(policy, at_once=True)  # on disk before anyone can see it, in either sync mode
            self._policies[policy_id] = policy
            self._feed.bump(policy_id)
        self._log.info("policy created", policy_id=policy_id, owner=owner,
                       observation_shape=list(spec.observation_shape), discrete_actions=spec.discrete_actions,
                       algorithm=spec.algorithm)
        return policy.snapshot(self._writer.durable_version(policy_id), created=True)

    def get(self, policy_id: str) -> PolicySnapshot:
        """One policy's state."""
        policy = self._get(policy_id)
        with policy.lock:
            return policy.snapshot(self._writer.durable_version(policy_id))

    def owner(self, policy_id: str) -> str:
        """The token name that created the policy ("" without authentication); PolicyNotFound if none."""
        return self._get(policy_id).owner  # fixed at creation: no lock needed

    def list_policies(self) -> list[PolicySnapshot]:
        """Every policy, by id."""
        with self._lock:
            policies = sorted(self._policies.values(), key=lambda p: p.policy_id)
        snapshots = []
        for policy in policies:
            with policy.lock:
                snapshots.append(policy.snapshot(self._writer.durable_version(policy.policy_id)))
        return snapshots

    def delete(self, policy_id: str) -> None:
        """Remove a policy, its files and checkpoints; its watchers' streams end."""
        policy = self._get(policy_id)
        with self._lock:  # lock order everywhere: the dict's lock, then a policy's
            with policy.lock:
                self._check_live(policy, None)
                policy.deleted = True
                # Waits for a background write of this policy in flight and drops the pending one: no late write
                # can bring the policy back.
                self._writer.delete(policy_id, lambda: self._store.delete(policy_id))
            self._policies.pop(policy_id, None)
        self._feed.forget(policy_id)
        self._log.info("policy deleted", policy_id=policy_id)

    # ----------------------------------------------------------------- training

    def send_batch(self, policy_id: str, states: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                   dones: np.ndarray, expected_version: int | None = None, flush: bool = False,
                   return_model: bool = False, sync: bool = False, truncated: np.ndarray | None = None,
                   log_probs: np.ndarray | None = None, behaviour_version: int | None = None) -> BatchOutcome:
        """Validate, join to the held tail, split into episodes, update once; nothing changes on any error.

        With `sync`, return only once the resulting state is on disk (a no-op when every change is saved before
        the reply); NotDurable when that save fails, though the batch was applied. `truncated`, `log_probs` and
        `behaviour_version` are PPO's (see updates.ppo_batch_update); REINFORCE checks `truncated` and otherwise
        ignores it.
        """
        policy = self._get(policy_id)
        batch = validate_batch(policy.shape, states, actions, rewards, dones)
        cut = check_truncated(np.zeros(0, dtype=bool) if truncated is None else truncated, batch)
        client_log_probs = None
        if log_probs is not None and log_probs.size:
            if behaviour_version is not None:
                raise InvalidRequest("log_probs: give the behaviour policy as log_probs or as behaviour_version, "
                                     "not both", field="log_probs")
            client_log_probs = check_log_probs(policy.shape, log_probs, len(batch))
        if not policy.spec.is_ppo and (client_log_probs is not None or behaviour_version is not None):
            name = "log_probs" if client_log_probs is not None else "behaviour_version"
            raise InvalidRequest(f"{name}: policy {policy_id!r} learns with {policy.spec.algorithm}, which has no "
                                 "importance ratio; leave it unset", field=name)
        with policy.lock:
            self._check_live(policy, expected_version)
            behind = self._writer.writes_behind  # else saved before the reply (and rolled back if that fails)
            steps = BatchSteps(self._commit, self._persist, behind)
            if policy.spec.is_ppo:
                stats: UpdateStats | None = ppo_batch_update(policy, batch, cut, client_log_probs,
                                                             behaviour_version, steps)
            else:
                stats = reinforce_batch(policy, batch, flush, self._config.max_pending_steps, steps)
            change, version, pending = policy.change, policy.version, len(policy.tail)
            durable = self._writer.durable_version(policy_id)
            model = policy.torchscript_now() if return_model and stats is not None else b""
        if stats is not None:
            self._feed.bump(policy_id)
        if sync:
            self._writer.wait(policy_id, change)  # outside the lock: other batches go on while this one waits
            durable = self._writer.durable_version(policy_id)  # this batch's version, or a newer one's
        return BatchOutcome(policy_id, version, stats is not None, stats, pending, durable, model)

    def set_weights(self, policy_id: str, data: bytes, expected_version: int | None = None) -> PolicySnapshot:
        """Replace the weights with a safetensors state dict (the optimizer restarts); version + 1."""
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, expected_version)
            weights = weights_from_safetensors(data, policy.net, "safetensors")
            with Rollback(policy):
                policy.net.load_state_dict(weights)
                policy.optimizer = policy.new_optimizer()
                self._commit(policy, new_version=True, at_once=True)
            snapshot = policy.snapshot(self._writer.durable_version(policy_id))
        self._feed.bump(policy_id)
        return snapshot

    # ----------------------------------------------------------------- reading the policy

    def log_prob(self, policy_id: str, states: np.ndarray, actions: np.ndarray, version: int | None = None,
                 checkpoint: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Log-probabilities and entropies of actions in states, and the critic's values of the states (PPO; empty
        for REINFORCE), under the current, a kept or a saved version."""
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
                check_name(checkpoint, "checkpoint")
                tensors, metadata = self._checkpoint(policy, checkpoint)
                net, used = new_net(policy.spec), int(metadata["version"])
                net.load_state_dict(net_weights(tensors))
                critic = new_critic(policy.spec)
                if critic is not None:
                    critic.load_state_dict(critic_weights(tensors))
            elif version is not None and version != policy.version:
                if version not in policy.recent:
                    raise CheckpointNotFound(
                        f"version: {version} is not kept; kept versions are {sorted(policy.recent)}", field="version")
                net, used = new_net(policy.spec), version
                actor_weights, kept_critic = split_weights(policy.recent[version])
                net.load_state_dict(actor_weights)
                critic = new_critic(policy.spec)
                if critic is not None:
                    critic.load_state_dict(kept_critic)
            else:
                # The current version: evaluate the live networks under the lock rather than copy them.
                return (*log_probs_of(policy.net, batch), values_of(policy.critic, batch), policy.version)
        return (*log_probs_of(net, batch), values_of(critic, batch), used)

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
        since = self._feed.revision(policy_id)
        with policy.lock:
            seen = policy.revision
            first = self._update_message(policy, include_model) if policy.version > from_version else None
        if first is not None:
            yield first
        for _ in self._feed.changes(policy_id, since, is_active, poll_seconds):
            if policy.deleted:
                return
            with policy.lock:
                if policy.revision == seen:  # already sent as `first`
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
            tensors, metadata = encode(policy)
            self._store.save_checkpoint(policy_id, name, tensors, metadata)
            return CheckpointInfo(name, policy.version, float(metadata["saved_at"]))

    def load_checkpoint(self, policy_id: str, name: str) -> PolicySnapshot:
        """Restore a named checkpoint: weights, optimizer, version and held tail."""
        check_name(name, "name")
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, None)
            tensors, metadata = self._checkpoint(policy, name)
            with Rollback(policy):
                apply_state(policy, tensors, metadata)
                # The checkpoint's own version is restored, often an older one: saved at once, so that
                # durable_version never names a state the policy has left.
                self._commit(policy, new_version=False, at_once=True)
            snapshot = policy.snapshot(self._writer.durable_version(policy_id))
        self._feed.bump(policy_id)
        return snapshot

    def list_checkpoints(self, policy_id: str) -> list[CheckpointInfo]:
        """The policy's named checkpoints."""
        policy = self._get(policy_id)
        with policy.lock:
            self._check_live(policy, None)
            return [CheckpointInfo(name, int(meta.get("version", 0)), float(meta.get("saved_at", 0.0)))
                    for name, meta in self._store.checkpoints(policy_id)]

    def durable_version(self, policy_id: str) -> int:
        """The newest version of the policy known to be on disk."""
        self._get(policy_id)
        return self._writer.durable_version(policy_id)

    def close(self) -> None:
        """End every watch stream, then write every pending state (changes after this are saved at once)."""
        self._feed.close()
        self._writer.close()

    # ----------------------------------------------------------------- internals

    def _get(self, policy_id: str) -> LivePolicy:
        if not policy_id:
            raise InvalidRequest("policy_id is required", field="policy_id")
        with self._lock:
            policy = self._policies.get(policy_id)
        if policy is None:
            check_name(policy_id, "policy_id")
            raise PolicyNotFound(f"policy_id: no policy {policy_id!r}", field="policy_id")
        return policy

    def _check_live(self, policy: LivePolicy, expected_version: int | None) -> None:
        if policy.deleted:
            raise PolicyNotFound(f"policy_id: policy {policy.policy_id!r} was deleted", field="policy_id")
        if expected_version is not None and expected_version != policy.version:
            raise VersionConflict(f"expected_version: policy {policy.policy_id!r} is at version {policy.version}, "
                                  f"not {expected_version}", field="expected_version")

    def _checkpoint(self, policy: LivePolicy, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        found = self._store.load_checkpoint(policy.policy_id, name)
        if found is None:
            raise CheckpointNotFound(f"checkpoint: policy {policy.policy_id!r} has no checkpoint {quoted(name)}",
                                     field="checkpoint")
        return found

    def _commit(self, policy: LivePolicy, new_version: bool, at_once: bool) -> None:
        """Record a state change: a new revision (and version), its weights kept for ComputeLogProb, saved."""
        if new_version:
            policy.version += 1
        policy.revision += 1
        policy.updated_at = time.time()
        policy.remember_version(self._config.versions_kept)
        self._persist(policy, at_once)

    def _persist(self, policy: LivePolicy, at_once: bool) -> None:
        """Save the policy's state now (raising, so the caller's Rollback undoes the change), or tell the writer
        it changed. Always the last step of a change: nothing after it may fail and roll memory back."""
        policy.change += 1
        if at_once:
            # Written under the policy's lock, so the live tensors need no copy (the store encodes them).
            self._writer.write(policy.policy_id, StateSnapshot(policy.change, policy.version, *encode(policy)))
        else:
            self._writer.changed(policy.policy_id, policy.change,
                                 lambda: StateSnapshot(policy.change, policy.version, *encode(policy)))

    def _snapshot(self, policy_id: str) -> StateSnapshot | None:
        """For the writer: the policy's newest state, copied under its lock; None once it is gone."""
        with self._lock:
            policy = self._policies.get(policy_id)
        if policy is None:
            return None
        with policy.lock:
            if policy.deleted:
                return None
            return StateSnapshot(policy.change, policy.version, *encode_snapshot(policy))

    def _update_message(self, policy: LivePolicy, include_model: bool) -> ModelUpdate:
        return ModelUpdate(policy.policy_id, policy.version, policy.last_update,
                           self._writer.durable_version(policy.policy_id),
                           policy.torchscript_now() if include_model else b"")
