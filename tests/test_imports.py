"""What each serving process imports: never torch, boto3 or matplotlib.

Each role is imported in a fresh interpreter (the modules a running process
loads, including the load generator's dataset path), and the test fails if
one of the heavy, role-specific packages came along (pyproject.toml puts
them in extras: train, deploy, report)."""

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("torch", "boto3", "botocore", "matplotlib")

LOAD_DATASET = """
import contextlib
from loadgen.inputs import InputsError, load_from_manifest
from services.common.manifest import Manifest
manifest = Manifest(name="m", role="base", arch="mlp", dataset="digits", split_seed=0, split={},
                    input_shape=(1, 8, 8), input_dtype="float32", output_shape=(10,), onnx_file="m.onnx")
# A shape mismatch is fine here: what counts is that the dataset module was imported.
with contextlib.suppress(InputsError):
    load_from_manifest(manifest)
"""

ROLES = {
    "frontend": "import services.frontend.app, services.frontend.engine, services.frontend.observe",
    "model_server": "import services.model_server.app, services.model_server.runner, onnxruntime",
    "coder": "import services.coder.app, services.coder.core",
    "loadgen": "import loadgen.cli, loadgen.runner, loadgen.control, loadgen.stats\n" + LOAD_DATASET,
    "registry": "import services.common.registry",
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_role_imports_none_of_the_heavy_extras(role):
    code = ROLES[role] + (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], f"{role} imported them"
