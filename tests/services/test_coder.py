"""The coder service as a real process: results equal coding_ext called in-process."""

import asyncio
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import coding_ext
from parm.v1 import coder_pb2 as pb
from parm.v1 import coder_pb2_grpc as pb_grpc
from services.common import tensors
from services.common.procs import ServiceProcess
from services.common.server import insecure_channel


@pytest.fixture(scope="module")
def coder():
    proc = ServiceProcess.python_module("services.coder", ["--port", "0"], name="coder")
    yield proc
    proc.stop()


def _call(address, method, request):
    async def body():
        async with insecure_channel(address) as channel:
            stub = pb_grpc.CoderStub(channel)
            try:
                return await getattr(stub, method)(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()

    return asyncio.run(body())


def _encode_request(encoder, arrays, scale=(), shift=()):
    return pb.EncodeRequest(encoder=encoder, inputs=[tensors.to_proto(a) for a in arrays],
                            scale=list(scale), shift=list(shift))


def _arrays(k, shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(k)]
    return [rng.standard_normal(shape).astype(dtype) for _ in range(k)]


@pytest.mark.parametrize(
    "k, shape, dtype",
    [(2, (4, 1, 28, 28), np.float32), (3, (2, 784), np.float32), (4, (3, 3, 8, 8), np.float32),
     (2, (2, 1, 8, 8), np.uint8)],
)
def test_sum_encode_equals_coding_ext(coder, k, shape, dtype):
    inputs = _arrays(k, shape, dtype, seed=k)
    reply = _call(coder.address, "Encode", _encode_request("sum", inputs))
    got = tensors.from_proto(reply.parity)
    np.testing.assert_array_equal(got, coding_ext.sum_encode(inputs))
    np.testing.assert_allclose(got, sum(a.astype(np.float32) for a in inputs), rtol=1e-5, atol=1e-5)
    assert reply.encode_us > 0


def test_sum_encode_with_scale_and_shift_equals_coding_ext(coder):
    inputs = _arrays(2, (2, 3, 4, 4), seed=9)
    scale, shift = [0.5, 2.0, 1.0], [0.1, -0.2, 0.0]
    reply = _call(coder.address, "Encode", _encode_request("sum", inputs, scale, shift))
    expected = coding_ext.sum_encode(inputs, scale=np.float32(scale), shift=np.float32(shift))
    np.testing.assert_array_equal(tensors.from_proto(reply.parity), expected)
    np.testing.assert_array_equal(expected, coding_ext.reference.sum_encode(
        inputs, scale=np.float32(scale), shift=np.float32(shift)))


@pytest.mark.parametrize("k", [2, 4])
def test_concat_encode_equals_coding_ext(coder, k):
    inputs = _arrays(k, (2, 3, 8, 8), seed=k)
    reply = _call(coder.address, "Encode", _encode_request("concat", inputs))
    got = tensors.from_proto(reply.parity)
    assert got.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(got, coding_ext.concat_encode(inputs))
    np.testing.assert_array_equal(got, coding_ext.reference.concat_encode(inputs))


@pytest.mark.parametrize("available", [1, 3])
def test_decode_equals_coding_ext(coder, available):
    outputs = _arrays(available + 1, (5, 10), seed=available)
    parity = coding_ext.sum_encode(outputs)
    request = pb.DecodeRequest(parity_output=tensors.to_proto(parity),
                               available_outputs=[tensors.to_proto(o) for o in outputs[1:]])
    reply = _call(coder.address, "Decode", request)
    got = tensors.from_proto(reply.reconstruction)
    np.testing.assert_array_equal(got, coding_ext.subtract_decode(parity, outputs[1:]))
    np.testing.assert_allclose(got, outputs[0], rtol=1e-5, atol=1e-5)
    assert reply.decode_us > 0


F32 = _arrays(2, (2, 3, 8, 8))


@pytest.mark.parametrize(
    "method, request_, message",
    [
        ("Encode", _encode_request("xor", F32), "encoder 'xor' not in ('sum', 'concat')"),
        ("Encode", _encode_request("sum", F32[:1]), "encode needs k >= 2 inputs, got 1"),
        ("Encode", _encode_request("sum", [F32[0], np.zeros((2, 3, 8, 9), np.float32)]),
         "inputs[1]: shape [2, 3, 8, 9] differs from inputs[0]'s [2, 3, 8, 8]"),
        ("Encode", _encode_request("sum", [F32[0], F32[1].astype(np.float16)]),
         "inputs[1]: dtype float16 differs from inputs[0]'s float32"),
        ("Encode", _encode_request("concat", _arrays(3, (2, 3, 8, 8))), "concat_encode supports k = 2 or 4"),
        ("Encode", _encode_request("concat", F32, scale=[1.0, 1.0, 1.0]),
         "scale/shift apply to the sum encoder only"),
        ("Encode", _encode_request("sum", F32, scale=[1.0, 2.0]), "scale"),
        ("Decode", pb.DecodeRequest(parity_output=tensors.to_proto(np.zeros((2, 10), np.float32))),
         "decode needs at least one available output"),
        ("Decode", pb.DecodeRequest(parity_output=tensors.to_proto(np.zeros((2, 10), np.float32)),
                                    available_outputs=[tensors.to_proto(np.zeros((2, 9), np.float32))]),
         "outputs (parity_output first)[1]: shape [2, 9] differs"),
        ("Decode", pb.DecodeRequest(parity_output=pb.DecodeRequest().parity_output.__class__(
            dtype=1, shape=[2], data=b"123")), "parity_output: 3 data bytes"),
    ],
)
def test_bad_input_is_invalid_argument_and_coder_keeps_serving(coder, method, request_, message):
    code, details = _call(coder.address, method, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    reply = _call(coder.address, "Encode", _encode_request("sum", F32))
    np.testing.assert_array_equal(tensors.from_proto(reply.parity), coding_ext.sum_encode(F32))


def test_health_serving(coder):
    async def body():
        async with insecure_channel(coder.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return (await stub.Check(health_pb2.HealthCheckRequest(service="parm.v1.Coder"), timeout=5)).status

    assert asyncio.run(body()) == health_pb2.HealthCheckResponse.SERVING


def test_reference_kernels_flag():
    with ServiceProcess.python_module("services.coder", ["--port", "0", "--kernels", "reference"],
                                      name="coder-ref") as proc:
        assert proc.info["kernels"] == "coding_ext.reference"
        inputs = _arrays(2, (2, 3, 8, 8), seed=3)
        reply = _call(proc.address, "Encode", _encode_request("concat", inputs))
    np.testing.assert_array_equal(tensors.from_proto(reply.parity), coding_ext.concat_encode(inputs))


def test_cli_mistake_is_one_line():
    out = subprocess.run([sys.executable, "-m", "services.coder", "--executor-workers", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "python -m services.coder: error: argument --executor-workers: must be >= 1, got 0"
