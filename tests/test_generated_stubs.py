"""The committed stubs in generated/ match proto/, and import under their own name from anywhere."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True, env={**os.environ, "PYTHON": sys.executable})
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(ROOT / "generated") for p in (ROOT / "generated").rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == committed, "run scripts/gen_protos.sh and commit generated/"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / "generated" / p, shallow=False)]
    assert not stale, f"stale generated files (run scripts/gen_protos.sh): {stale}"


def test_stubs_import_from_any_directory(tmp_path: Path) -> None:
    code = ("import rl_service_proto.v1.training_pb2_grpc as g, rl_service_proto.v1.training_pb2 as pb; "
            "print(pb.DESCRIPTOR.package, g.TrainingServiceStub.__name__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["rl_service.v1", "TrainingServiceStub"]
