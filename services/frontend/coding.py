"""Encoders and decoders as the frontend uses them: in-process or remote; pinned buffers.

``LocalCoder`` calls the native ``coding_ext`` kernels (``coding_ext.load_kernels
("native")``, the one way to load them; they release the GIL): inline on the
event loop when the step is small (``inline_max_bytes``; the kernel then takes
microseconds and a thread hop would cost more), else in the frontend's
executor. ``RemoteCoder`` calls a ``parm.v1.Coder`` service.

Both expose ``inline(nbytes)``; when it is true the engine calls
``encode_now``/``decode_now`` synchronously, otherwise it awaits
``encode``/``decode``. Inputs: ``encode`` takes k arrays of shape (B, *S);
``decode`` takes the parity output (B, *O) and the k-1 available outputs
(B, *O) each, and returns the reconstruction (B, *O). A ``LocalCoder``
(``accepts_out``) writes into a caller's buffer given as ``out=``; its
``encode_job``/``decode_job`` return the executor future itself, so a caller
whose task is cancelled can still tell when the kernel stops writing.

``CodingPools`` holds the pinned buffers of the coded path (see its
docstring for who owns a buffer when).
"""

import asyncio
import logging

import grpc
import numpy as np

import coding_ext
from parm.v1 import coder_pb2, coder_pb2_grpc
from services.common import tensors
from services.common.server import open_channel

log = logging.getLogger(__name__)

KINDS = ("parity", "reconstruction")


class LocalCoder:
    """In-process coding with the native ``coding_ext`` kernels.

    ``out``: None (the kernel allocates its float32 result) or a float32,
    C-contiguous ndarray of the result's shape that the kernel overwrites.
    """

    accepts_out = True

    def __init__(self, encoder, *, executor=None, inline_max_bytes=1 << 20):
        kernels = coding_ext.load_kernels("native")
        self._encode = kernels.encoder(encoder)     # ValueError naming the choices
        self._decode = kernels.subtract_decode
        self.encoder = encoder
        self._executor = executor
        self.inline_max_bytes = inline_max_bytes

    def inline(self, nbytes):
        return self._executor is None or nbytes <= self.inline_max_bytes

    def encode_now(self, inputs, out=None):
        return self._encode([np.ascontiguousarray(x) for x in inputs], out)

    def decode_now(self, parity_output, available, out=None):
        return self._decode(np.ascontiguousarray(parity_output),
                            [np.ascontiguousarray(a) for a in available], out)

    def encode_job(self, inputs, out=None):
        """``encode_now`` in the executor; returns its asyncio future (done when the kernel is)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, self.encode_now, inputs, out)

    def decode_job(self, parity_output, available, out=None):
        """``decode_now`` in the executor; returns its asyncio future (done when the kernel is)."""
        return asyncio.get_running_loop().run_in_executor(
            self._executor, self.decode_now, parity_output, available, out)

    async def encode(self, inputs, out=None):
        return await self.encode_job(inputs, out)

    async def decode(self, parity_output, available, out=None):
        return await self.decode_job(parity_output, available, out)

    async def close(self):
        pass


class CodingPools:
    """Pinned buffers for the frontend's coded path: parity inputs and reconstructions.

    Coded mode pads every batch to ``batch_size`` rows, so every parity input
    has shape (batch_size, *input_shape) and every reconstruction (batch_size,
    *output_shape), float32: one ``coding_ext.BufferPool`` of ``count``
    buffers each (page-aligned, page-locked where the OS allows), made when
    the frontend is built. Everything here runs on the event loop thread.

    Ownership (``redundancy/coded.py`` follows it; the tests check it):
        - ``acquire(kind)`` never waits (timeout 0). When every buffer of
          ``kind`` is out it returns None and counts a miss; the caller then
          lets the kernel allocate (``out=None``). A query never fails for
          lack of a buffer.
        - A parity input buffer belongs to the parity ``Batch`` (``batch.buffer``,
          also ``batch.inputs``) from the encode until its group finishes
          (complete or abandoned): retries re-read the inputs, so it lives as
          long as the batch can be dispatched. ``prepare`` serialises the
          batch from it (the wire bytes are a copy).
        - A reconstruction buffer belongs to its ``Group`` (``group.rec_buffer``)
          from the decode until the group finishes: the reconstruction stays
          referenced for scoring a late original against it. If the original
          wins (the reconstruction is discarded or never offered), the buffer
          is released at once. Answers never reference it: a reconstructed
          answer carries a copy of its row (the servicer serialises answers
          after the engine has moved on).
        - A buffer handed to an executor job is the job's until the kernel
          returns: if the awaiting task is cancelled or the group goes first,
          ``release_after`` returns the buffer when the job's future is done,
          never earlier (the thread may still be writing into it). An error
          of the kernel (job done) releases at once.
        - ``close()`` (after the engine has closed, which abandons every open
          group) waits for such jobs, then closes the pools.

    Args:
        parity_shape: (batch_size, *input_shape).
        reconstruction_shape: (batch_size, *output_shape).
        count: buffers per pool, >= 1.
        lock: try to mlock the buffers.
    """

    def __init__(self, parity_shape, reconstruction_shape, count, *, lock=True):
        self.pools = {
            "parity": coding_ext.BufferPool(parity_shape, count, np.float32, lock=lock),
            "reconstruction": coding_ext.BufferPool(reconstruction_shape, count, np.float32, lock=lock),
        }
        self.count = int(count)
        self.hits = dict.fromkeys(KINDS, 0)
        self.misses = dict.fromkeys(KINDS, 0)
        self._jobs = set()

    def shape(self, kind):
        return self.pools[kind].shape

    def available(self, kind):
        """Free buffers of ``kind`` now."""
        return self.pools[kind].available

    def acquire(self, kind, shape):
        """A free buffer of ``kind`` for a result of ``shape``, or None (a miss: allocate)."""
        pool = self.pools[kind]
        if tuple(shape) == pool.shape:
            try:
                buf = pool.acquire(0)
            except coding_ext.PoolExhausted:
                pass
            else:
                self.hits[kind] += 1
                return buf
        self.misses[kind] += 1
        return None

    def release(self, kind, buf):
        """Gives ``buf`` back (the caller and every view of it must be done with it)."""
        self.pools[kind].release(buf)

    def release_after(self, job, kind, buf):
        """Releases ``buf`` once the executor ``job`` writing into it is done."""
        self._jobs.add(job)

        def done(_):
            self._jobs.discard(job)
            self.release(kind, buf)

        job.add_done_callback(done)

    async def close(self):
        """Waits for executor jobs that still own a buffer, then closes the pools."""
        while self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)
            await asyncio.sleep(0)      # their done callbacks release
        for kind, pool in self.pools.items():
            out = pool.count - pool.available
            if out:
                log.error("coding pool %s closed with %d buffers still out", kind, out)
                continue
            pool.close()


class RemoteCoder:
    """``parm.v1.Coder`` over gRPC (``--coder ADDRESS``).

    With a ``fallback`` (a ``LocalCoder``), a call that fails because the
    service is down or too slow (UNAVAILABLE, DEADLINE_EXCEEDED) is done by
    the fallback instead, and counted in ``fallbacks``; the next call tries
    the service again. Other errors (a bad request) propagate.
    """

    FALLBACK_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    accepts_out = False     # the service's reply is the result; the fallback allocates too

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
