"""The reference environment server: any Gymnasium id served over rl_service.v1.EnvironmentService.

`python -m rl_service.envserver --env CartPole-v1 --num-envs 8 --port 50061` runs it; the `rl-service env-server`
console command is wired to `rl_service.envserver.main(argv)` (argv without the program name, returns the exit
code). It is the template a simulation in another language follows (see docs/environment-protocol.md), and what
the tests and benchmarks train against. `rl_service.envserver.compliance` checks any server against the contract.
`--processes P` spreads the envs over worker processes (process_batch.py, process_worker.py, process_wire.py) and
reads the Session stream ahead (read_ahead.py), with the answers of one process.
Imports no torch: it starts in about a second.
"""

from rl_service.envserver.cli import main

__all__ = ["main"]
