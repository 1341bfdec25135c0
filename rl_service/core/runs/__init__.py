"""Managed runs (TrainingService): requests.py validates, state_machine.py decides every state change,
orchestrator.py schedules and applies them, jobs.py and events.py are what travels to and from a worker as plain
versioned dicts, worker.py trains one run, history.py serves its episodes, ports.py names what infra provides.

This package's __init__ imports nothing, so jobs, events and the state machine load without torch.
"""
