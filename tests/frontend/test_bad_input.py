"""Malformed input is INVALID_ARGUMENT naming the problem, never INTERNAL (issue 13 item 10)."""

import dataclasses

import grpc
import numpy as np
import pytest

from parm.inference import grpc_service_pb2 as pb
from parm.inference import grpc_service_pb2_grpc as pb_grpc
from parm.v1 import frontend_pb2, tensor_pb2
from services.common import tensors
from services.common.errors import InvalidInput
from services.frontend.kserve import InferenceServicer
from tests.frontend.fakes import base_manifest
from tests.frontend.test_service import Deployment, lin, x

pytestmark = pytest.mark.timeout(60)


def infer_request(shape, *, name="input", datatype="FP32", raw=None, fp32=None, uint=None):
    r = pb.ModelInferRequest(model_name="lin")
    t = r.inputs.add(name=name, datatype=datatype, shape=shape)
    if fp32 is not None:
        t.contents.fp32_contents.extend(fp32)
    if uint is not None:
        t.contents.uint_contents.extend(uint)
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**40, 0, 2**40], [0, 2**63 - 1]])
def test_zero_size_tensor_with_huge_dimensions(shape):
    with pytest.raises(InvalidInput, match=r"input: shape \[.*\] is too large"):
        tensors.from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=shape, data=b""), "input")


def test_uint8_values_above_255_in_typed_contents():
    servicer = InferenceServicer(None, dataclasses.replace(base_manifest(), input_dtype="uint8"))
    with pytest.raises(InvalidInput, match=r"value 300 is out of range for UINT8 \[0, 255\]"):
        servicer._parse(infer_request([1, 4], datatype="UINT8", uint=[1, 2, 300, 4]))
    out = servicer._parse(infer_request([1, 4], datatype="UINT8", uint=[1, 2, 255, 0]))
    assert out.dtype == np.uint8 and out.tolist() == [[1, 2, 255, 0]]


@pytest.mark.parametrize("request_, message", [
    (infer_request([2**62, 4], raw=b""), "0 raw bytes, shape [4611686018427387904, 4] needs 73786976294838206464"),
    (infer_request([2**62, 4], fp32=[1.0]), "1 values in contents, shape [4611686018427387904, 4]"),
    (infer_request([1, 4], raw=np.zeros(4, np.float32).tobytes(), fp32=[1, 2, 3, 4]),
     "both raw_input_contents and typed contents are set"),
    (infer_request([1, 4], name="x", raw=np.zeros(4, np.float32).tobytes()), "unknown input 'x'"),
])
def test_kserve_parse_rejects(request_, message):
    with pytest.raises(InvalidInput) as err:
        InferenceServicer(None, base_manifest())._parse(request_)
    assert message in str(err.value)


async def test_over_grpc_each_is_invalid_argument_and_the_frontend_keeps_serving(models):
    d = await Deployment().start(models, {"d0": ("data", {})})
    try:
        bad_predict = frontend_pb2.PredictRequest(input=tensor_pb2.Tensor(
            dtype=tensor_pb2.FLOAT32, shape=[0, 2**62, 2**62], data=b""))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await d.stub.Predict(bad_predict, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "too large" in err.value.details()
        kserve = pb_grpc.GRPCInferenceServiceStub(d.channel)
        for req, message in [
                (infer_request([2**62, 4], raw=b""), "raw bytes"),
                (infer_request([1, 4], raw=np.zeros(4, np.float32).tobytes(), fp32=[1, 2, 3, 4]), "both"),
                (infer_request([1, 4], name="x", raw=np.zeros(4, np.float32).tobytes()), "unknown input")]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kserve.ModelInfer(req, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert message in err.value.details()
        r = await d.predict(x(1))
        np.testing.assert_array_equal(tensors.from_proto(r.output), lin(x(1))[0])
    finally:
        await d.close()
