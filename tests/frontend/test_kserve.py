"""The Open Inference Protocol (KServe v2) on the frontend's port, driven by tritonclient."""

import asyncio
import json
import sys

import numpy as np
import pytest

from tests.frontend.models import W
from tests.frontend.test_service import Deployment

pytestmark = pytest.mark.timeout(120)


async def test_tritonclient_uses_the_frontend_unchanged(models):
    d = await Deployment().start(models, {"d0": ("data", {}), "d1": ("data", {})}, "--batch-size", 2)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.frontend.triton_client_check", f"127.0.0.1:{d.app.port}", "lin",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, stderr.decode()[-2000:]
    finally:
        await d.close()
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"]
    meta = out["metadata"]
    assert meta["name"] == "lin" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "3"]}]
    x = np.array(out["input"], np.float32)
    np.testing.assert_allclose(np.array(out["output"]), x @ W, rtol=1e-6)
    assert out["sources"] == "ORIGINAL,ORIGINAL,ORIGINAL"
    status, message = out["bad_shape"]
    assert status == "StatusCode.INVALID_ARGUMENT" and "shape [2, 5]" in message
    status, message = out["unknown_model"]
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'no-such-model'" in message
