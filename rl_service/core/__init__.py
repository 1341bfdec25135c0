"""The service's domain logic, grouped by concept; no grpc, no generated stubs, no infra imports.

- runs/        managed runs (TrainingService): request validation, the state machine, the orchestrator that
               schedules them, the jobs and events exchanged with workers, the training worker, episode history
- policies/    named policies trained from client experience (PolicyService): spec, experience splitting, the
               in-memory policy, its on-disk format (state codec), the manager and its all-or-nothing changes
- algorithms/  what trains: the registry, typed hyperparameter schemas, REINFORCE (as an SB3 algorithm and as
               the update named policies use), policy networks
- models/      trained policies leaving training: checkpoint naming, serving (Act) and its cache, exporters for
               runs (zip, TorchScript, ONNX) and for named policies (TorchScript, safetensors)
- envs.py      environment ids and spaces (Gymnasium or external simulations), observation/action flattening
- errors.py    domain errors, each naming the request field at fault; seeds.py and watching.py are shared helpers

Each package reaches infra only through the Protocols in its ports.py, so its tests run on in-memory fakes.
"""
