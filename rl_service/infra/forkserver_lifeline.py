"""First module of the fork server's preload list: importing it makes the fork server die with its server."""

from rl_service.infra.process_lifeline import arm_fork_server

arm_fork_server()
