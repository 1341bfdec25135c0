"""Every algorithm's hyperparameter schema, with its library's defaults (stable-baselines3 or sb3-contrib).

Shared groups: COMMON (vectorisation, network shape), SERVICE (normalisation and evaluation, for every algorithm),
ON_POLICY (actor-critics) and OFF_POLICY (replay-buffer learners). Keys in SERVICE_KEYS are used by the service;
the rest go to the algorithm's constructor unchanged.
"""

from __future__ import annotations

from rl_service.core.algorithms.hyperparams import Param, merge
from rl_service.core.algorithms.normalize import OFF

# A replay buffer is allocated up front, so every off-policy algorithm takes 50k rather than its library's 1M by
# default (1M transitions of a large observation would take gigabytes the user did not ask for), capped at 5M.
DEFAULT_BUFFER_SIZE = 50_000
MAX_BUFFER_SIZE = 5_000_000
MAX_EVAL_EPISODES = 100
MAX_ENV_GROUPS = 2  # infra's adapters keep at most two steps in flight (MAX_STEPS_IN_FLIGHT)

# Keys every algorithm accepts: how the environment is vectorised and the policy network's shape.
COMMON = (
    Param("n_envs", "int", 1, 1, 64, help="parallel environments stepped together"),
    Param("net_arch", "net_arch", (64, 64), help="hidden layer widths of the policy (and value) network"),
    Param("activation_fn", "choice", "tanh", choices=("tanh", "relu"), help="hidden layer activation"),
)

# Normalisation and evaluation, for every algorithm (rl-baselines3-zoo's `normalize`; SB3's EvalCallback).
SERVICE = (
    Param("normalize", "normalize", OFF,
          help="VecNormalize: true (observations and rewards), obs (observations only), false, or a JSON object "
               "of its options"),
    Param("eval_freq", "int", 0, 0, 1_000_000_000,
          help="evaluate every this many timesteps on a separate environment (0: never)"),
    Param("n_eval_episodes", "int", 5, 1, MAX_EVAL_EPISODES, help="deterministic episodes per evaluation"),
    Param("stop_at_reward", "float", None, optional=True,
          help="end the run SUCCEEDED once an evaluation's mean reward reaches this (none: never)"),
    Param("env_groups", "int", 1, 1, MAX_ENV_GROUPS,
          help="groups of envs in flight against a simulation: 1 lockstep, 2 double-buffered (on-policy only)"),
)

# Keys consumed by the service itself rather than passed to the algorithm's constructor.
SERVICE_KEYS = frozenset({"n_envs", "net_arch", "activation_fn", "normalize", "eval_freq", "n_eval_episodes",
                          "stop_at_reward", "action_noise", "action_noise_std", "env_groups"})
# Keys that shape the policy network: they travel in the constructor's policy_kwargs (rl-baselines3-zoo writes
# them there too, e.g. qrdqn.yml's `policy_kwargs: "dict(net_arch=[256, 256], n_quantiles=10)"`).
POLICY_KEYS = frozenset({"n_quantiles", "n_critics", "log_std_init"})
MAX_QUANTILES = 1000
MAX_CRITICS = 10

# Keys the on-policy actor-critics share (PPO, A2C, TRPO, MaskablePPO), with stable-baselines3's defaults.
ON_POLICY = (
    Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor"),
    Param("gae_lambda", "float", 0.95, 0.0, 1.0, help="GAE bias/variance trade-off"),
    Param("ent_coef", "float", 0.0, 0.0, 10.0, help="entropy bonus weight"),
    Param("vf_coef", "float", 0.5, 0.0, 10.0, help="value loss weight"),
    Param("max_grad_norm", "float", 0.5, 0.0, 1e6, low_exclusive=True, help="gradient clipping norm"),
    Param("use_sde", "bool", False, help="generalised state-dependent exploration (Box actions only)"),
    Param("sde_sample_freq", "int", -1, -1, 1_000_000, help="resample the SDE noise every n steps (-1: per rollout)"),
    # stable-baselines3's ActorCriticPolicy default; used by Box action spaces only.
    Param("log_std_init", "float", 0.0, -20.0, 20.0, help="initial log standard deviation of Box actions"),
)

_PPO_KEYS = (
    Param("learning_rate", "float", 3e-4, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
    Param("n_steps", "int", 2048, 1, 1_000_000, help="steps per env per rollout"),
    Param("batch_size", "int", 64, 2, 1_000_000, help="minibatch size"),
    Param("n_epochs", "int", 10, 1, 1000, help="optimisation epochs per rollout"),
    Param("clip_range", "float", 0.2, 0.0, 10.0, low_exclusive=True, schedule=True, help="policy clip range"),
    Param("clip_range_vf", "float", None, 0.0, 1e6, low_exclusive=True, schedule=True, optional=True,
          help="value clip range (none: no clipping)"),
    Param("normalize_advantage", "bool", True, help="normalise advantages per minibatch"),
    Param("target_kl", "float", None, 0.0, 10.0, low_exclusive=True, optional=True,
          help="stop an update's epochs early past this KL (none: never)"),
)

PPO_SCHEMA = merge(COMMON, SERVICE, ON_POLICY, _PPO_KEYS)

# sb3-contrib's MaskablePPO: PPO's keys without state-dependent exploration (it acts on discrete spaces only).
MASKABLE_PPO_SCHEMA = merge(COMMON, SERVICE,
                            [p for p in ON_POLICY if p.name not in ("use_sde", "sde_sample_freq", "log_std_init")],
                            _PPO_KEYS)

A2C_SCHEMA = merge(
    COMMON, SERVICE, ON_POLICY,
    (
        Param("learning_rate", "float", 7e-4, 0.0, 1.0, low_exclusive=True, schedule=True, help="optimiser step size"),
        Param("n_steps", "int", 5, 1, 1_000_000, help="steps per env per update"),
        Param("gae_lambda", "float", 1.0, 0.0, 1.0, help="GAE bias/variance trade-off"),
        Param("rms_prop_eps", "float", 1e-5, 0.0, 1.0, low_exclusive=True, help="RMSprop epsilon"),
        Param("use_rms_prop", "bool", True, help="RMSprop (true) or Adam (false)"),
        Param("normalize_advantage", "bool", False, help="normalise advantages"),
    ),
)

# sb3-contrib's TRPO: an on-policy actor-critic without entropy or value-loss weights (the critic has its own
# updates) and a trust region instead of a clip range.
TRPO_SCHEMA = merge(
    COMMON, SERVICE, [p for p in ON_POLICY if p.name not in ("ent_coef", "vf_coef", "max_grad_norm")],
    (
        Param("learning_rate", "float", 1e-3, 0.0, 1.0, low_exclusive=True, schedule=True,
              help="the critic's Adam step size"),
        Param("n_steps", "int", 2048, 1, 1_000_000, help="steps per env per rollout"),
        Param("batch_size", "int", 128, 2, 1_000_000, help="minibatch size of the critic's updates"),
        Param("cg_max_steps", "int", 15, 1, 1000, help="conjugate-gradient steps for the step direction"),
        Param("cg_damping", "float", 0.1, 0.0, 1e3, help="damping of the Hessian-vector product"),
        Param("line_search_shrinking_factor", "float", 0.8, 0.0, 1.0, low_exclusive=True,
              help="step shrink per line-search iteration"),
        Param("line_search_max_iter", "int", 10, 1, 1000, help="line-search iterations at most"),
        Param("n_critic_updates", "int", 10, 1, 1000, help="critic updates per rollout"),
        Param("normalize_advantage", "bool", True, help="normalise advantages"),
        Param("target_kl", "float", 0.01, 0.0, 10.0, low_exclusive=True, help="trust-region size (KL bound)"),
        Param("sub_sampling_factor", "int", 1, 1, 1000, help="use every n-th sample for the policy step"),
    ),
)

# Keys every off-policy algorithm shares; stable-baselines3's defaults except buffer_size (see above).
OFF_POLICY = (
    # stable-baselines3's off-policy networks use ReLU; its actor-critic policies use Tanh.
    Param("activation_fn", "choice", "relu", choices=("tanh", "relu"), help="hidden layer activation"),
    Param("buffer_size", "int", DEFAULT_BUFFER_SIZE, 1, MAX_BUFFER_SIZE, help="replay buffer capacity (transitions)"),
    Param("learning_starts", "int", 100, 0, 100_000_000, help="steps collected before learning starts"),
    Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor"),
    Param("gradient_steps", "int", 1, -1, 10_000,
          help="gradient steps per update (-1: as many as env steps; 0 is refused)"),
)

DQN_SCHEMA = merge(
    COMMON, SERVICE, OFF_POLICY,
    (
        Param("learning_rate", "float", 1e-4, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
        Param("batch_size", "int", 32, 1, 1_000_000, help="minibatch size"),
        Param("tau", "float", 1.0, 0.0, 1.0, low_exclusive=True, help="target network soft-update coefficient"),
        Param("train_freq", "int", 4, 1, 1_000_000, help="env steps between updates"),
        Param("target_update_interval", "int", 10_000, 1, 100_000_000, help="env steps between target updates"),
        Param("exploration_fraction", "float", 0.1, 0.0, 1.0, help="fraction of training over which epsilon decays"),
        Param("exploration_initial_eps", "float", 1.0, 0.0, 1.0, help="initial epsilon"),
        Param("exploration_final_eps", "float", 0.05, 0.0, 1.0, help="final epsilon"),
        Param("max_grad_norm", "float", 10.0, 0.0, 1e6, low_exclusive=True, help="gradient clipping norm"),
    ),
)

# sb3-contrib's QR-DQN: DQN's keys with its own defaults (no gradient clipping unless asked).
QRDQN_SCHEMA = merge(
    DQN_SCHEMA.params,
    (
        Param("learning_rate", "float", 5e-5, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
        Param("exploration_fraction", "float", 0.005, 0.0, 1.0,
              help="fraction of training over which epsilon decays"),
        Param("exploration_final_eps", "float", 0.01, 0.0, 1.0, help="final epsilon"),
        Param("max_grad_norm", "float", None, 0.0, 1e6, low_exclusive=True, optional=True,
              help="gradient clipping norm (none: no clipping)"),
        Param("n_quantiles", "int", 200, 1, MAX_QUANTILES, help="quantiles per action in the Q-network"),
    ),
)

# Continuous-action actor-critics with a replay buffer (SAC, TD3, DDPG, TQC).
_CONTINUOUS = (
    Param("batch_size", "int", 256, 1, 1_000_000, help="minibatch size"),
    Param("tau", "float", 0.005, 0.0, 1.0, low_exclusive=True, help="target network soft-update coefficient"),
    Param("train_freq", "int", 1, 1, 1_000_000, help="env steps between updates"),
    Param("action_noise", "choice", "none", choices=("none", "normal", "ornstein-uhlenbeck"),
          help="exploration noise added to the actor's actions"),
    Param("action_noise_std", "float", 0.1, 0.0, 1e3, help="the noise's standard deviation, per action dimension"),
)

_ENTROPY = (
    Param("learning_rate", "float", 3e-4, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
    Param("ent_coef", "float", "auto", 0.0, 1e3, words=("auto",),
          help="entropy weight (auto: learnt, starting at 1)"),
    Param("target_entropy", "float", "auto", -1e6, 1e6, words=("auto",),
          help="entropy the learnt weight aims for (auto: -dim(actions))"),
    Param("target_update_interval", "int", 1, 1, 100_000_000, help="gradient steps between target updates"),
    Param("use_sde", "bool", False, help="generalised state-dependent exploration"),
    Param("sde_sample_freq", "int", -1, -1, 1_000_000, help="resample the SDE noise every n steps (-1: per rollout)"),
    Param("use_sde_at_warmup", "bool", False, help="SDE rather than uniform actions before learning starts"),
    # stable-baselines3's SAC actor default; used with use_sde only.
    Param("log_std_init", "float", -3.0, -20.0, 20.0, help="initial log standard deviation of the SDE noise"),
)

SAC_SCHEMA = merge(COMMON, SERVICE, OFF_POLICY, _CONTINUOUS, _ENTROPY,
                   (Param("net_arch", "net_arch", (256, 256), help="hidden layer widths of the actor and critics"),))

TQC_SCHEMA = merge(
    SAC_SCHEMA.params,
    (
        Param("top_quantiles_to_drop_per_net", "int", 2, 0, MAX_QUANTILES, help="quantiles dropped per critic"),
        Param("n_quantiles", "int", 25, 1, MAX_QUANTILES, help="quantiles each critic outputs"),
        Param("n_critics", "int", 2, 1, MAX_CRITICS, help="critic networks"),
    ),
)

TD3_SCHEMA = merge(
    COMMON, SERVICE, OFF_POLICY, _CONTINUOUS,
    (
        Param("net_arch", "net_arch", (400, 300), help="hidden layer widths of the actor and critics"),
        Param("learning_rate", "float", 1e-3, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
        Param("policy_delay", "int", 2, 1, 1_000_000, help="critic updates per actor update"),
        Param("target_policy_noise", "float", 0.2, 0.0, 1e3, help="std of the target policy smoothing noise"),
        Param("target_noise_clip", "float", 0.5, 0.0, 1e3, help="clip of the target policy smoothing noise"),
    ),
)

DDPG_SCHEMA = merge(
    COMMON, SERVICE, OFF_POLICY, _CONTINUOUS,
    (
        Param("net_arch", "net_arch", (400, 300), help="hidden layer widths of the actor and critic"),
        Param("learning_rate", "float", 1e-3, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
    ),
)

REINFORCE_SCHEMA = merge(
    COMMON, SERVICE,
    (
        Param("learning_rate", "float", 1e-3, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
        Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor of the Monte-Carlo returns"),
        Param("beta", "float", 0.1, 0.0, 10.0, help="entropy bonus weight"),
        Param("episodes_per_update", "int", 1, 1, 10_000, help="complete episodes per gradient step"),
        Param("max_grad_norm", "float", None, 0.0, 1e6, low_exclusive=True, optional=True,
              help="gradient clipping norm (none: no clipping)"),
        Param("net_arch", "net_arch", (64, 64), help="hidden layer widths of the policy network"),
    ),
)
