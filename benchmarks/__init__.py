"""Benchmarks: run as modules, e.g. `python -m benchmarks.external_env`; results land in benchmarks/results/."""
