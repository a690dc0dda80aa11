"""The coder core: encode/decode over ``coding_ext``, into pooled output buffers.

No grpc here. The kernels are a ``coding_ext.Kernels`` (``load_kernels`` by
name: "native" by default, "reference" for the numpy definitions), so the
service computes exactly what an in-process caller of the same kernels gets.

Buffers and who owns them:

- Every encode or decode is one job on the core's executor. The job leases
  an output array from ``self.outputs`` (a ``coding_ext.OutputPool``:
  page-aligned, page-locked where the OS allows), runs the kernel into it
  (``out=``), hands it to the caller's ``into`` callback (the servicer
  serialises it into the reply there: ``tensors.to_proto`` copies the bytes),
  and returns the buffer to the pool when the job ends. The lease never
  crosses a thread or an ``await``: it begins and ends inside the one
  executor job, so the event loop never sees a pooled array.
- So a reply never references a pooled buffer: by the time the RPC's
  coroutine resumes, the buffer may already be another job's. ``into`` must
  copy what it keeps; without ``into``, the core returns a copy.
- Cancellation: a cancelled RPC cancels the await. A job still queued is
  cancelled with it and never leases; a job already running finishes its
  kernel and ``into`` (writing into a reply nobody will send), then releases
  the buffer in its ``finally``. Errors (a bad input rejected by the
  kernel, an exception in ``into``) release the same way.
- Sizing: ``pool_buffers`` defaults to ``workers``, one buffer per kernel
  thread, so a lease never waits. With fewer buffers than threads, a job
  waits up to ``pool_wait_s`` for one and then fails with ``Overloaded``
  (RESOURCE_EXHAUSTED); nothing is allocated instead. An output larger than
  ``pool_buffer_bytes`` is allocated for that call (``outputs.misses``).
  ``pool_buffers=0`` turns pooling off (``out=None``: the kernel allocates),
  the "before" of ``make bench``.

Timing: ``encode_us``/``decode_us`` are measured with ``perf_counter_ns``
around the kernel call only (inside the executor thread), excluding
(de)serialisation and executor hand-off, so they compare with the same call
made in-process.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from coding_ext import ENCODERS, OutputPool, PoolExhausted, load_kernels
from services.common.errors import InvalidInput, Overloaded

__all__ = ["DEFAULT_POOL_BUFFER_BYTES", "ENCODERS", "CoderCore", "load_kernels"]

DEFAULT_POOL_BUFFER_BYTES = 4 << 20  # a (6, 3, 224, 224) float32 batch is 3.6 MB; 2 workers lock 8 MiB (a common RLIMIT_MEMLOCK)


def _same_layout(arrays, what):
    first = arrays[0]
    for i, a in enumerate(arrays[1:], start=1):
        if a.dtype != first.dtype:
            raise InvalidInput(f"{what}[{i}]: dtype {a.dtype.name} differs from {what}[0]'s {first.dtype.name}")
        if a.shape != first.shape:
            raise InvalidInput(f"{what}[{i}]: shape {list(a.shape)} differs from {what}[0]'s {list(first.shape)}")


def _copy(array):
    return np.array(array, copy=True)


class CoderCore:
    """Encoder and decoder; ``workers`` threads run the kernels off the event loop.

    Args:
        kernels: a ``coding_ext.Kernels`` (``load_kernels(name)``).
        workers: kernel threads.
        pool_buffers: pooled output buffers (default: ``workers``; 0: no
            pool, the kernels allocate).
        pool_buffer_bytes: capacity of each buffer.
        pool_wait_s: how long a job waits for a free buffer before
            ``Overloaded``.
    """

    def __init__(self, kernels, *, workers=1, pool_buffers=None,
                 pool_buffer_bytes=DEFAULT_POOL_BUFFER_BYTES, pool_wait_s=1.0):
        self.kernels = kernels
        workers = int(workers)
        pool_buffers = workers if pool_buffers is None else int(pool_buffers)
        self.outputs = OutputPool(pool_buffer_bytes, pool_buffers) if pool_buffers > 0 else None
        self.pool_wait_s = pool_wait_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="coder")

    async def encode(self, encoder, inputs, scale=None, shift=None, *, into=None):
        """Encodes k batches into one parity batch.

        Args:
            encoder: "sum" | "concat".
            inputs: k >= 2 ndarrays of shape (B, *S), one dtype.
            scale, shift: optional per-channel affine (sum only), len C each.
            into: called with the parity (float32 (B, *S)) while the job owns
                its buffer; must copy what it keeps. Default: a copy.

        Returns:
            (what ``into`` returned, encode_us).
        """
        if encoder not in ENCODERS:
            raise InvalidInput(f"encoder {encoder!r} not in {ENCODERS}")
        if len(inputs) < 2:
            raise InvalidInput(f"encode needs k >= 2 inputs, got {len(inputs)}")
        _same_layout(inputs, "inputs")
        if encoder == "concat" and (scale or shift):
            raise InvalidInput("scale/shift apply to the sum encoder only")
        kwargs = {}
        if scale:
            kwargs["scale"] = np.asarray(scale, dtype=np.float32)
        if shift:
            kwargs["shift"] = np.asarray(shift, dtype=np.float32)
        fn = self.kernels.encoder(encoder)
        return await self._run(fn, inputs[0].shape, (list(inputs),), kwargs, into)

    async def decode(self, parity_output, available, *, into=None):
        """Reconstructs the one missing output: parity_output - sum(available).

        Args:
            parity_output: ndarray (B, *O).
            available: the k-1 outputs that arrived, each (B, *O), same dtype.
            into: as for ``encode``, called with the reconstruction.

        Returns:
            (what ``into`` returned, decode_us).
        """
        if not available:
            raise InvalidInput("decode needs at least one available output (k - 1 >= 1)")
        _same_layout([parity_output, *available], "outputs (parity_output first)")
        return await self._run(self.kernels.subtract_decode, parity_output.shape,
                               (parity_output, list(available)), {}, into)

    async def _run(self, fn, shape, args, kwargs, into):
        into = _copy if into is None else into

        def job():
            if self.outputs is None:
                out, us = self._kernel(fn, args, None, kwargs)
                return into(out), us
            try:
                with self.outputs.lease(shape, np.float32, self.pool_wait_s) as buf:
                    out, us = self._kernel(fn, args, buf, kwargs)
                    return into(out), us
            except PoolExhausted as exc:
                raise Overloaded(f"coder: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    @staticmethod
    def _kernel(fn, args, out, kwargs):
        start = time.perf_counter_ns()
        try:
            out = fn(*args, out, **kwargs)
        except InvalidInput:
            raise
        except (ValueError, TypeError) as exc:
            raise InvalidInput(str(exc)) from None
        return out, (time.perf_counter_ns() - start) / 1000.0

    def close(self):
        """Stops the executor (waiting for a running job, so every lease has ended) and the pool."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.outputs is not None:
            self.outputs.close()
