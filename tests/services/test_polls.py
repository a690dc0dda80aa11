"""The one health-poll loop: "not up yet" is retried, anything else fails at once."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.certs import make_certs
from services.common import tls as tls_mod
from services.common.clock import ManualClock
from services.common.polls import PollTimeout, not_up_yet, poll_until
from services.common.server import create_server, open_channel


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code, details=""):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize("code, details, expected", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
    (grpc.StatusCode.UNAVAILABLE, "last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
                                  "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: WRONG_VERSION_NUMBER", False),
    (grpc.StatusCode.UNIMPLEMENTED, "Method not found!", False),
    (grpc.StatusCode.INTERNAL, "bug", False),
])
def test_not_up_yet(code, details, expected):
    assert not_up_yet(_RpcError(code, details)) is expected


def test_retries_not_up_yet_until_the_probe_answers():
    clock = ManualClock(start_s=0.0)
    answers = [_RpcError(grpc.StatusCode.UNAVAILABLE, "refused"), None,
               _RpcError(grpc.StatusCode.DEADLINE_EXCEEDED), "up"]
    tries = []

    async def probe():
        tries.append(clock.now())
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def body():
        task = asyncio.create_task(poll_until(probe, 10.0, period_s=0.5, clock=clock))
        await clock.run_for(5.0)
        return await task

    assert asyncio.run(body()) == "up"
    assert tries == [0.0, 0.5, 1.0, 1.5]


def test_a_real_error_propagates_at_once():
    calls = []

    async def probe():
        calls.append(1)
        raise _RpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(poll_until(probe, 60.0, clock=ManualClock()))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and calls == [1]


def test_timeout_names_the_last_answer():
    clock = ManualClock(start_s=0.0)

    async def probe():
        raise _RpcError(grpc.StatusCode.UNAVAILABLE, "Connection refused")

    async def body():
        task = asyncio.create_task(poll_until(probe, 2.0, period_s=0.5, what="frontend x", clock=clock))
        await clock.run_for(3.0)
        return await task

    with pytest.raises(PollTimeout) as info:
        asyncio.run(body())
    assert str(info.value) == "frontend x not ready after 2 s; last answer UNAVAILABLE: Connection refused"


def test_tls_client_against_a_plaintext_server_fails_at_once(tmp_path):
    """The regression of issue 17: a TLS mismatch looked like "not up yet" until the timeout."""
    certs = make_certs(tmp_path, ["127.0.0.1"])
    client_tls = tls_mod.TlsConfig(ca=certs.ca)

    async def body():
        built = create_server("127.0.0.1:0", [], tls=tls_mod.PLAINTEXT)
        await built.server.start()
        await built.set_serving(True)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with open_channel(f"127.0.0.1:{built.port}", tls=client_tls) as channel:
                stub = health_pb2_grpc.HealthStub(channel)

                async def probe():
                    return await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await poll_until(probe, 60.0)
        finally:
            await built.server.stop(0)
        return info.value, loop.time() - start

    error, took_s = asyncio.run(body())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "handshake" in error.details().lower()
    assert took_s < 10.0
