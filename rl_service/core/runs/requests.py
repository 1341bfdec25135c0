"""StartTraining's semantic validation: every field checked before anything is recorded or written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rl_service.core.algorithms.hyperparams import HyperValue, format_value
from rl_service.core.algorithms.masking import masks_missing, registered_env_has_masks
from rl_service.core.algorithms.network_size import check_run_network
from rl_service.core.algorithms.normalize import NormalizeOptions
from rl_service.core.algorithms.registry import AlgorithmSpec, get_algorithm
from rl_service.core.envs import EnvSpaces, ExternalEnvironments, env_spaces, is_external_env
from rl_service.core.errors import EnvironmentLacksFeature, InvalidHyperparameter, InvalidRequest, quoted
from rl_service.core.runs.records import RunRecord, RunState, TrainingRequest
from rl_service.core.seeds import seed_or_random

MIN_CHECKPOINT_INTERVAL = 100
DEFAULT_NET_ARCH = (64, 64)  # what constructor_kwargs builds when a schema has no net_arch
MAX_EXPERIMENT_ID = 128


@dataclass(frozen=True)
class RequestLimits:
    """The server's caps on a run request (from settings)."""

    max_total_timesteps: int = 100_000_000
    default_checkpoint_interval: int = 10_000
    max_network_parameters: int = 10_000_000  # parameters of a run's policy (MAX_NETWORK_PARAMETERS)


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed every check, with defaults filled in."""

    experiment_id: str
    spec: AlgorithmSpec
    hyperparameters: Mapping[str, str]  # effective values (defaults included), formatted by the schema
    checkpoint_interval: int
    seed: int


def validate_request(request: TrainingRequest, limits: RequestLimits,
                     external_envs: ExternalEnvironments | None) -> ValidatedRequest:
    """Check a StartTraining request; the first error names its field (InvalidRequest and subclasses)."""
    experiment_id = check_experiment_id(request.experiment_id)
    spec = get_algorithm(request.algorithm)
    if request.total_timesteps <= 0:
        raise InvalidRequest(f"total_timesteps: must be positive, got {request.total_timesteps}",
                             field="total_timesteps")
    if request.total_timesteps > limits.max_total_timesteps:
        raise InvalidRequest(
            f"total_timesteps: {request.total_timesteps} exceeds this server's cap of "
            f"{limits.max_total_timesteps} (MAX_TOTAL_TIMESTEPS)", field="total_timesteps")
    interval = request.checkpoint_interval or limits.default_checkpoint_interval
    if interval < MIN_CHECKPOINT_INTERVAL:
        raise InvalidRequest(
            f"checkpoint_interval: must be 0 (server default) or at least {MIN_CHECKPOINT_INTERVAL}, "
            f"got {request.checkpoint_interval}", field="checkpoint_interval")
    seed = seed_or_random(request.seed, "seed")
    values = spec.schema.parse(request.hyperparameters)
    external = is_external_env(request.env_id)
    if not external:  # a simulation's n_envs is known only from its spec
        _refuse_groups_in_process(spec, request.env_id, values)
        spec.validate(values)
    spaces = env_spaces(request.env_id, external_envs)
    if external and spaces.num_envs is not None:
        values = _simulation_n_envs(request, values, spaces.num_envs)
        spec.validate(values)
    spec.check_spaces(spaces.action_space, values, spaces.observation_space)
    # A simulation's masks are known once a worker reaches it; one that sends none has every action legal.
    if spec.needs_action_masks and not external and not registered_env_has_masks(request.env_id):
        raise masks_missing(spec.name, request.env_id)
    if external and values.get("eval_freq"):
        # An evaluation needs a second instance of the environment; a simulation hosts one set of envs for one
        # client (docs/environment-protocol.md), so evaluating would reset the envs training is stepping.
        raise InvalidHyperparameter(
            "hyperparameters['eval_freq']: evaluations need a separate environment instance, and a simulation "
            "serves one client at a time; evaluate registered Gymnasium environments only, or export the policy "
            "and evaluate it against your simulation", field="hyperparameters.eval_freq")
    if external:
        _check_simulation_groups(request.env_id, values, spaces)
    check_run_network(spec.name, spaces.observation_space, spaces.action_space,
                      values.get("net_arch") or DEFAULT_NET_ARCH,  # type: ignore[arg-type]
                      limits.max_network_parameters, policy_options=values)
    effective = {key: format_value(value) for key, value in sorted(values.items())}
    return ValidatedRequest(experiment_id, spec, effective, interval, seed)


def check_experiment_id(experiment_id: str) -> str:
    """The experiment id, "default" when blank; InvalidRequest when too long or unprintable."""
    value = experiment_id.strip() or "default"
    if len(value) > MAX_EXPERIMENT_ID or not value.isprintable():
        raise InvalidRequest(
            f"experiment_id: at most {MAX_EXPERIMENT_ID} printable characters", field="experiment_id")
    return value


def _simulation_n_envs(request: TrainingRequest, values: dict[str, HyperValue], hosted: int
                       ) -> dict[str, HyperValue]:
    """An external simulation decides how many envs step together; a client's different n_envs is refused."""
    if any(key.strip().lower() == "n_envs" for key in request.hyperparameters) and values.get("n_envs") != hosted:
        raise InvalidHyperparameter(
            f"hyperparameters['n_envs']: the simulation at {quoted(request.env_id)} hosts {hosted} envs; omit "
            f"n_envs or set it to {hosted}", field="hyperparameters.n_envs")
    return {**values, "n_envs": hosted}


def _refuse_groups_in_process(spec: AlgorithmSpec, env_id: str, values: Mapping[str, HyperValue]) -> None:
    """env_groups > 1 with a registered Gymnasium env: refused (after the algorithm's own refusal, if any)."""
    if spec.check_env_groups_supported(values) > 1:
        raise InvalidHyperparameter(
            f"hyperparameters['env_groups']: {quoted(env_id)} runs in the worker's own process, where stepping envs "
            "cannot overlap the policy's forward pass; env_groups > 1 is for external simulations (grpc://, "
            "unix:)", field="hyperparameters.env_groups")


def _check_simulation_groups(env_id: str, values: Mapping[str, HyperValue], spaces: EnvSpaces) -> None:
    """env_groups > 1 against a simulation (algorithm and n_envs checked by validate): observations not normalised,
    a simulation stepping env subsets."""
    groups = int(values.get("env_groups") or 1)  # type: ignore[arg-type]
    if groups == 1:
        return
    options = values.get("normalize")
    if isinstance(options, NormalizeOptions) and options.norm_obs:
        raise InvalidHyperparameter(
            "hyperparameters['env_groups']: with groups in flight a group acts before the others' observations "
            "of the same step exist, and observation normalisation needs them all; use normalize "
            '{"norm_obs": false} (rewards only) or env_groups 1', field="hyperparameters.env_groups")
    if not spaces.env_subsets:
        # The request is well-formed; the simulation it names lacks a feature (upgrading it makes the same request
        # succeed): FAILED_PRECONDITION rather than INVALID_ARGUMENT.
        raise EnvironmentLacksFeature(
            f"hyperparameters['env_groups']: the simulation at {quoted(env_id)} steps all its envs at once "
            f"(environment protocol version 1); {groups} groups need one that steps a subset (protocol version 2, "
            "StepRequest.env_ids)", field="hyperparameters.env_groups")


def resume_budget(record: RunRecord, total_timesteps: int | None, max_total_timesteps: int) -> int:
    """The total_timesteps a resumed run trains to; InvalidRequest for one it cannot take."""
    total = record.total_timesteps if total_timesteps is None else total_timesteps
    if total > max_total_timesteps:
        raise InvalidRequest(f"total_timesteps: {total} exceeds this server's cap of {max_total_timesteps} "
                             "(MAX_TOTAL_TIMESTEPS)", field="total_timesteps")
    if total < record.timesteps_done or (record.state is RunState.SUCCEEDED and total <= record.timesteps_done):
        raise InvalidRequest(
            f"total_timesteps: the run has trained {record.timesteps_done} timesteps; give a larger total "
            f"(got {total})", field="total_timesteps")
    return total
