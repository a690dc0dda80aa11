"""Encoders and decoders as the frontend uses them: in-process or remote.

``LocalCoder`` calls the ``coding_ext`` kernels (which release the GIL):
inline on the event loop when the step is small (``inline_max_bytes``; the
kernel then takes microseconds and a thread hop would cost more), else in the
frontend's executor. ``RemoteCoder`` calls a ``parm.v1.Coder`` service.

Both expose ``inline(nbytes)``; when it is true the engine calls
``encode_now``/``decode_now`` synchronously, otherwise it awaits
``encode``/``decode``. Inputs: ``encode`` takes k arrays of shape (B, *S);
``decode`` takes the parity output (B, *O) and the k-1 available outputs
(B, *O) each, and returns the reconstruction (B, *O).
"""

import asyncio
import logging

import grpc
import numpy as np

from parm.v1 import coder_pb2, coder_pb2_grpc
from services.common import tensors
from services.common.server import open_channel

log = logging.getLogger(__name__)


def _kernels():
    import coding_ext

    if hasattr(coding_ext, "sum_encode"):
        return coding_ext
    from coding_ext import reference  # the numpy twin of the kernels

    return reference


class LocalCoder:
    """In-process coding with ``coding_ext``."""

    def __init__(self, encoder, *, executor=None, inline_max_bytes=1 << 20):
        if encoder not in ("sum", "concat"):
            raise ValueError(f"unknown encoder {encoder!r} (sum|concat)")
        self.encoder = encoder
        self._executor = executor
        self.inline_max_bytes = inline_max_bytes
        k = _kernels()
        self._encode = k.sum_encode if encoder == "sum" else k.concat_encode
        self._decode = k.subtract_decode

    def inline(self, nbytes):
        return self._executor is None or nbytes <= self.inline_max_bytes

    def encode_now(self, inputs):
        return self._encode([np.ascontiguousarray(x) for x in inputs])

    def decode_now(self, parity_output, available):
        return self._decode(np.ascontiguousarray(parity_output),
                            [np.ascontiguousarray(a) for a in available])

    async def encode(self, inputs):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.encode_now, inputs)

    async def decode(self, parity_output, available):
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.decode_now, parity_output, available)

    async def close(self):
        pass


class RemoteCoder:
    """``parm.v1.Coder`` over gRPC (``--coder ADDRESS``).

    With a ``fallback`` (a ``LocalCoder``), a call that fails because the
    service is down or too slow (UNAVAILABLE, DEADLINE_EXCEEDED) is done by
    the fallback instead, and counted in ``fallbacks``; the next call tries
    the service again. Other errors (a bad request) propagate.
    """

    FALLBACK_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def __init__(self, address, encoder, *, timeout_s=1.0, fallback=None):
        self.encoder = encoder
        self.address = address
        self.timeout_s = timeout_s
        self.fallback = fallback
        self.fallbacks = 0
        self._falling_back = False
        self._channel = open_channel(address)
        self._stub = coder_pb2_grpc.CoderStub(self._channel)

    def inline(self, nbytes):
        return False

    async def _or_fallback(self, remote, local, *args):
        try:
            result = await remote(*args)
        except grpc.aio.AioRpcError as exc:
            if self.fallback is None or exc.code() not in self.FALLBACK_CODES:
                raise
            if not self._falling_back:
                log.warning("coder %s: %s; coding in process until it answers again", self.address,
                            exc.code().name)
                self._falling_back = True
            self.fallbacks += 1
            return await local(*args)
        if self._falling_back:
            log.warning("coder %s answers again", self.address)
            self._falling_back = False
        return result

    async def encode(self, inputs):
        return await self._or_fallback(self._encode_remote, getattr(self.fallback, "encode", None), inputs)

    async def decode(self, parity_output, available):
        return await self._or_fallback(self._decode_remote, getattr(self.fallback, "decode", None),
                                       parity_output, available)

    async def _encode_remote(self, inputs):
        req = coder_pb2.EncodeRequest(encoder=self.encoder)
        for x in inputs:
            tensors.to_proto(x, req.inputs.add())
        reply = await self._stub.Encode(req, timeout=self.timeout_s)
        return tensors.from_proto(reply.parity, "coder parity")

    async def _decode_remote(self, parity_output, available):
        req = coder_pb2.DecodeRequest()
        tensors.to_proto(parity_output, req.parity_output)
        for a in available:
            tensors.to_proto(a, req.available_outputs.add())
        reply = await self._stub.Decode(req, timeout=self.timeout_s)
        return tensors.from_proto(reply.reconstruction, "coder reconstruction")

    async def close(self):
        await self._channel.close(grace=None)
