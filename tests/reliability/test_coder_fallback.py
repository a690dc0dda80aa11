"""RemoteCoder falls back to in-process coding when the coder service is down."""

import asyncio
import socket

import grpc
import numpy as np
import pytest

from services.frontend.coding import LocalCoder, RemoteCoder


def _dead_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens


def test_dead_coder_service_falls_back_or_fails_as_configured():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)]
    outs = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2)]
    parity_out = outs[0] + outs[1]

    async def body():
        address = _dead_address()
        local = LocalCoder("sum")
        with_fallback = RemoteCoder(address, "sum", timeout_s=1.0, fallback=local)
        without = RemoteCoder(address, "sum", timeout_s=1.0)
        try:
            parity = await with_fallback.encode(xs)
            rec = await with_fallback.decode(parity_out, [outs[1]])
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await without.encode(xs)
            return parity, rec, with_fallback.fallbacks, exc.value.code()
        finally:
            await with_fallback.close()
            await without.close()

    parity, rec, fallbacks, code = asyncio.run(body())
    np.testing.assert_allclose(parity, xs[0] + xs[1], rtol=1e-6)
    np.testing.assert_allclose(rec, outs[0], rtol=1e-5, atol=1e-6)
    assert fallbacks == 2
    assert code == grpc.StatusCode.UNAVAILABLE
