"""Trained policies on their way out: checkpoints.py names checkpoint files, serving.py answers Act and export
for runs through act_cache.py, run_exporters.py and policy_exporters.py write the formats clients load, and
ports.py is the model store infra provides."""
