"""A client built from proto/ alone (grpc_tools, no rl_service import) drives every TrainingService RPC."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import ServerHandle

ROOT = Path(__file__).resolve().parents[2]

CLIENT = textwrap.dedent("""
    import sys
    import grpc
    assert "rl_service" not in sys.modules
    from rl_service_proto.v1 import training_pb2 as pb, training_pb2_grpc as g
    assert pb.__file__.startswith(sys.argv[2]), pb.__file__  # the freshly compiled stubs, not the package's
    stub = g.TrainingServiceStub(grpc.insecure_channel(sys.argv[1]))
    run_id = stub.StartTraining(pb.StartTrainingRequest(algorithm="a2c", env_id="CartPole-v1",
                                total_timesteps=500, checkpoint_interval=200, seed=3)).run_id
    states = [pb.RunState.Name(s.state) for s in stub.WatchTraining(pb.RunRequest(run_id=run_id))]
    status = stub.GetTrainingStatus(pb.RunRequest(run_id=run_id))
    listed = [r.run_id for r in stub.ListRuns(pb.ListRunsRequest(state=pb.SUCCEEDED)).runs]
    act = stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0, 0.1, 0.0, -0.1], deterministic=True))
    batch = stub.ActBatch(pb.ActBatchRequest(run_id=run_id, observations=[0.0] * 8, deterministic=True))
    stopped = stub.StopTraining(pb.RunRequest(run_id=run_id))
    print(states[-1], pb.RunState.Name(status.state), run_id in listed, len(act.action), batch.count,
          pb.RunState.Name(stopped.state))
""")


def test_client_compiled_from_proto_alone_runs_every_rpc(server: ServerHandle, tmp_path: Path) -> None:
    protos = sorted(str(p) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", *protos], check=True)
    (tmp_path / "client.py").write_text(CLIENT)
    result = subprocess.run([sys.executable, "client.py", server.address, str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SUCCEEDED", "SUCCEEDED", "True", "1", "2", "SUCCEEDED"]


def test_server_reflection_lists_the_services(server: ServerHandle) -> None:
    services = set(ProtoReflectionDescriptorDatabase(server.channel).get_services())
    assert {"rl_service.v1.TrainingService", "grpc.health.v1.Health"} <= services
