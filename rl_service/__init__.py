"""rl_service: a gRPC service that trains reinforcement-learning policies."""

__version__ = "0.1.0"
