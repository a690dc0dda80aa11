"""One test per row of the interceptor's table (services/common/errors.py), in-process."""

import asyncio
import logging

import grpc
import pytest

from parm.v1 import coder_pb2 as pb
from parm.v1 import coder_pb2_grpc as pb_grpc
from services.common import errors
from services.common.server import create_server, insecure_channel

RAISES = {
    "invalid": errors.InvalidInput("inputs[1]: shape [2, 3] differs"),
    "no_instance": errors.NoInstance("no parity instance"),
    "instance_failed": errors.InstanceFailed("instance i1 failed"),
    "overloaded": errors.Overloaded("queue full (100 batches)"),
    "deadline": errors.DeadlineExceeded("batch timed out after 5 ms"),
    "timeout": asyncio.TimeoutError(),
    "not_found": errors.NotFound("no batch 7"),
    "bug": RuntimeError("secret internal detail"),
}


class RaisingCoder(pb_grpc.CoderServicer):
    """Raises the exception named by ``encoder``; answers normally for "ok"."""

    async def Encode(self, request, context):
        if request.encoder == "ok":
            return pb.EncodeResponse(encode_us=1.5)
        raise RAISES[request.encoder]


async def _call(name):
    """Starts the servicer on port 0, calls Encode(name) then Encode("ok"); returns both outcomes."""
    built = create_server("127.0.0.1:0", [(pb_grpc.add_CoderServicer_to_server, RaisingCoder(), "parm.v1.Coder")])
    await built.server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{built.port}") as channel:
            stub = pb_grpc.CoderStub(channel)
            try:
                await stub.Encode(pb.EncodeRequest(encoder=name), timeout=5)
                outcome = None
            except grpc.aio.AioRpcError as exc:
                outcome = (exc.code(), exc.details())
            after = await stub.Encode(pb.EncodeRequest(encoder="ok"), timeout=5)
        return outcome, after.encode_us
    finally:
        await built.server.stop(0)


@pytest.mark.parametrize(
    "name, code",
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
        ("no_instance", grpc.StatusCode.UNAVAILABLE),
        ("instance_failed", grpc.StatusCode.UNAVAILABLE),
        ("overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("not_found", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_domain_exception_maps_to_code_with_message(name, code):
    outcome, after = asyncio.run(_call(name))
    assert outcome == (code, str(RAISES[name]))
    assert after == 1.5  # the server keeps serving after an error


def test_asyncio_timeout_is_deadline_exceeded():
    outcome, _ = asyncio.run(_call("timeout"))
    assert outcome == (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


def test_unexpected_exception_is_internal_with_generic_message(caplog):
    with caplog.at_level(logging.ERROR, logger="services.common.errors"):
        outcome, after = asyncio.run(_call("bug"))
    assert outcome == (grpc.StatusCode.INTERNAL, "internal error (see the server log)")
    assert after == 1.5
    logged = [r for r in caplog.records if r.name == "services.common.errors"]
    assert logged and logged[0].exc_info[1] is RAISES["bug"]
