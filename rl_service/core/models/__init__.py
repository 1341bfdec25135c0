"""Trained policies on their way out: checkpoints.py names checkpoint files; serving.py answers Act and export for
runs through act_cache.py, rebuilding each policy without unpickling (run_policy_build.py, space_json.py,
policy_weights.py) into one CompiledActor (compiled_actor.py, actor_cores.py, served_policy.py) that Act runs and
run_exporters.py writes; policy_exporters.py exports named policies; normalization.py holds VecNormalize's
statistics; ports.py is the model store infra provides."""
