"""Malformed requests against a real frontend process: always a status code with a
message, never a crash or a hang; the frontend keeps serving. (The 10,000-case
run is ``python -m deploy.reliability.fuzz``.)"""

import grpc
import numpy as np
import psutil
import pytest

from deploy.reliability import fuzz, rig as rig_mod
from services.common import manifest as manifest_mod

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def target(tiny_artifacts, tmp_path_factory):
    rig = rig_mod.start_rig(tiny_artifacts, rig_mod.run_spec(mode="none", num_models=1, compute_ms=0),
                          tmp_path_factory.mktemp("fuzz"), frontend_extra_args=["--max-message-bytes", str(LIMIT)])
    base = manifest_mod.load(rig.models.base)
    t = fuzz.Target(rig.dep.frontend_address, base.input_shape, base.output_shape, base.name,
                    max_message_bytes=LIMIT)
    pids = {rig.dep.frontend.pid, rig.dep.registry.pid} | {s.pid for _, s in rig.dep.instances}
    try:
        yield t, rig
    finally:
        t.close()
        rig.stop()
    alive = [p for p in psutil.Process().children(recursive=True) if p.pid in pids and p.is_running()
             and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"deployment processes left: {alive}"


@pytest.fixture(autouse=True)
def no_orphan_processes():
    """The module-scoped deployment outlives single tests; ``target`` stops it and checks."""
    yield


@pytest.mark.slow
def test_fuzzed_predict_modelinfer_and_raw_bytes_get_clear_status_codes(target):
    t, rig = target
    counts = fuzz.run_cases(t, 600)
    kinds = {k for k, _ in counts}
    assert kinds == {"predict", "infer", "raw", "big"}
    assert sum(counts.values()) >= 600
    codes = {c for _, c in counts}
    assert codes <= fuzz.ALLOWED and {"OK", "INVALID_ARGUMENT"} <= codes
    assert counts[("big", "RESOURCE_EXHAUSTED")] == 2
    fuzz.valid_query(t)
    assert rig.dep.frontend.alive()


@pytest.mark.slow
def test_message_over_the_limit_is_resource_exhausted_and_serving_continues(target):
    from parm.v1 import frontend_pb2, tensor_pb2

    t, rig = target
    n = LIMIT // 4 + 1024  # float32 values: a request just over the limit
    req = frontend_pb2.PredictRequest(input=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[n],
                                                              data=np.zeros(n, "<f4").tobytes()))
    with pytest.raises(grpc.RpcError) as exc:
        t.predict(req, timeout=5)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in exc.value.details() or "exceeds" in exc.value.details()
    # just under the limit: parsed, then rejected for its shape (not for its size)
    m = (LIMIT - 200) // 4
    req = frontend_pb2.PredictRequest(input=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[m],
                                                              data=np.zeros(m, "<f4").tobytes()))
    with pytest.raises(grpc.RpcError) as exc:
        t.predict(req, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = fuzz.valid_query(t)
    assert reply.output.shape[-1] == t.output_shape[-1]
    assert rig.dep.frontend.alive()


def test_fuzz_cli_mistake_is_one_line(capsys):
    assert fuzz.main(["--cases", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
