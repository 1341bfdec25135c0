"""External environments over gRPC: the client side of rl_service.v1.EnvironmentService.

The modules are imported one by one (nothing here imports torch), so the reference environment server loads in a
second: `codec` (spaces, batches and action masks <-> proto), `address` (grpc:// and grpcs:// addresses and the
host allow-list), `env_batch` (Gymnasium envs stepped with auto-reset, and their action masks), `adapter` (the
ExternalEnvAdapter contract and a fake), `grpc_adapter` (the real client), `vec_env` (a stable-baselines3 VecEnv
over an adapter), `connector` (what core calls: spaces at StartTraining, the VecEnv in the worker).
"""
