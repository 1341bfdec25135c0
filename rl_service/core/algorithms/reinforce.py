"""REINFORCE as a stable-baselines3 algorithm, so managed runs use it exactly like PPO, A2C and DQN.

It subclasses SB3's BaseAlgorithm: `learn` (with callbacks, so progress, checkpoints and stop requests work),
`predict`, `save` and `load` all behave as for the library's own algorithms. Each vectorised env's transitions
are collected until its episode ends; every `episodes_per_update` complete episodes, one REINFORCE update
(rl_service.core.algorithms.reinforce_update) runs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn
from torch.distributions import Distribution

from rl_service.core.algorithms.networks import PolicyNet, action_distribution, build_policy_net, greedy_actions
from rl_service.core.algorithms.reinforce_update import Episode, reinforce_update


class ReinforcePolicy(BasePolicy):
    """SB3 policy wrapping a REINFORCE network (SB3's feature extractor flattens or one-hot encodes inputs)."""

    def __init__(self, observation_space: gym.Space[Any], action_space: gym.Space[Any], lr_schedule: Schedule,
                 net_arch: list[int] | None = None, activation_fn: type[nn.Module] = nn.Tanh,
                 log_std_init: float = 0.0, **kwargs: Any) -> None:
        super().__init__(observation_space, action_space, normalize_images=False, **kwargs)
        self.net_arch = list(net_arch) if net_arch is not None else [64, 64]
        self.activation_fn = activation_fn
        self.log_std_init = log_std_init
        self.features_extractor = self.make_features_extractor()
        self.net: PolicyNet = build_policy_net(self.features_extractor.features_dim, action_space, self.net_arch,
                                               activation_fn, log_std_init)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1),  # type: ignore[call-arg]
                                              **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(net_arch=self.net_arch, activation_fn=self.activation_fn, log_std_init=self.log_std_init)
        return data

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """Preprocessed, flattened observations: what the network takes."""
        out: torch.Tensor = self.extract_features(obs, self.features_extractor)
        return out

    def distribution(self, obs: torch.Tensor) -> Distribution:
        """The action distribution for raw (tensor) observations."""
        return action_distribution(self.net, self.features(obs))

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Actions for a batch of observations."""
        return self._predict(obs, deterministic)

    def _predict(self, observation: torch.Tensor | dict[str, torch.Tensor], deterministic: bool = False
                 ) -> torch.Tensor:
        assert isinstance(observation, torch.Tensor), "REINFORCE takes flat (non-Dict) observations"
        if deterministic:
            return greedy_actions(self.net, self.features(observation))
        sample: torch.Tensor = self.distribution(observation).sample()
        return sample


class Reinforce(BaseAlgorithm):
    """Monte-Carlo policy gradient with per-episode return normalisation and an entropy bonus."""

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": ReinforcePolicy}
    policy: ReinforcePolicy

    def __init__(self, policy: str | type[ReinforcePolicy], env: GymEnv | str | None,
                 learning_rate: float | Schedule = 1e-3, gamma: float = 0.99, beta: float = 0.1,
                 episodes_per_update: int = 1, max_grad_norm: float | None = None,
                 policy_kwargs: dict[str, Any] | None = None, stats_window_size: int = 100,
                 tensorboard_log: str | None = None, verbose: int = 0, seed: int | None = None,
                 device: torch.device | str = "auto", _init_setup_model: bool = True) -> None:
        super().__init__(policy, env, learning_rate, policy_kwargs=policy_kwargs,
                         stats_window_size=stats_window_size, tensorboard_log=tensorboard_log, verbose=verbose,
                         device=device, support_multi_env=True, seed=seed,
                         supported_action_spaces=(gym.spaces.Discrete, gym.spaces.Box))
        self.gamma = gamma
        self.beta = beta
        self.episodes_per_update = episodes_per_update
        self.max_grad_norm = max_grad_norm
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs).to(self.device)

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "policy.optimizer"], []

    def learn(self, total_timesteps: int, callback: MaybeCallback = None, log_interval: int = 1,
              tb_log_name: str = "REINFORCE", reset_num_timesteps: bool = True,
              progress_bar: bool = False) -> Reinforce:
        """Collect complete episodes from every env and update after each `episodes_per_update` of them."""
        total_timesteps, cb = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name,
                                                progress_bar)
        cb.on_training_start(locals(), globals())
        assert self.env is not None and self._last_obs is not None
        collector = _EpisodeCollector(self.env.num_envs)
        ready: list[Episode] = []
        while self.num_timesteps < total_timesteps:
            continue_training = self._step(collector, ready, cb)
            if len(ready) >= self.episodes_per_update:
                self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
                self.train_on(ready)
                ready = []
                if log_interval and self._n_updates % log_interval == 0:
                    self._dump_logs()
            if not continue_training:
                break
        cb.on_training_end()
        return self

    def _step(self, collector: _EpisodeCollector, ready: list[Episode], cb: BaseCallback) -> bool:
        """One vectorised env step; returns the callback's verdict on continuing."""
        assert self.env is not None
        last_obs = self._last_obs
        with torch.no_grad():
            obs_tensor: torch.Tensor = obs_as_tensor(last_obs, self.device)  # type: ignore[arg-type,assignment]
            actions = self.policy.distribution(obs_tensor).sample().cpu().numpy()
        env_actions = actions
        if isinstance(self.action_space, gym.spaces.Box):
            # The Gaussian is unbounded: the env gets the clipped action, the gradient the sampled one.
            env_actions = np.clip(actions, self.action_space.low, self.action_space.high)
        new_obs, rewards, dones, infos = self.env.step(env_actions)
        self.num_timesteps += self.env.num_envs
        cb.update_locals(locals())
        continue_training = cb.on_step()
        self._update_info_buffer(infos, dones)
        features = self.policy.features(obs_tensor).cpu().numpy()
        ready.extend(collector.add(features, actions, rewards, dones))
        self._last_obs = new_obs  # type: ignore[assignment]
        return bool(continue_training)

    def train_on(self, episodes: list[Episode]) -> None:
        """One REINFORCE update on complete episodes, logged under train/."""
        self._update_learning_rate(self.policy.optimizer)
        stats = reinforce_update(self.policy.net, self.policy.optimizer, episodes, self.gamma, self.beta,
                                 self.max_grad_norm)
        self._n_updates += 1
        self.logger.record("train/loss", stats.loss)
        self.logger.record("train/policy_loss", stats.policy_loss)
        self.logger.record("train/entropy", stats.entropy)
        self.logger.record("train/grad_norm", stats.grad_norm)
        self.logger.record("train/batch_return", stats.mean_return)
        self.logger.record("train/n_updates", self._n_updates)

    def _dump_logs(self) -> None:
        if self.ep_info_buffer:
            self.logger.record("rollout/ep_rew_mean", float(np.mean([e["r"] for e in self.ep_info_buffer])))
            self.logger.record("rollout/ep_len_mean", float(np.mean([e["l"] for e in self.ep_info_buffer])))
        self.logger.record("time/total_timesteps", self.num_timesteps)
        self.logger.dump(step=self.num_timesteps)


class _EpisodeCollector:
    """Per-env transition lists, turned into Episodes when an env's episode ends."""

    def __init__(self, num_envs: int) -> None:
        self._obs: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self._actions: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self._rewards: list[list[float]] = [[] for _ in range(num_envs)]

    def add(self, features: np.ndarray, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray
            ) -> list[Episode]:
        """Record one step of every env; return the episodes it completed."""
        finished = []
        for i in range(len(self._obs)):
            self._obs[i].append(features[i])
            self._actions[i].append(actions[i])
            self._rewards[i].append(float(rewards[i]))
            if dones[i]:
                finished.append(Episode(np.stack(self._obs[i]).astype(np.float32), np.stack(self._actions[i]),
                                        np.asarray(self._rewards[i], dtype=np.float64)))
                self._obs[i], self._actions[i], self._rewards[i] = [], [], []
        return finished


