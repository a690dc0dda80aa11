"""The coder core: encode/decode over ``coding_ext``, timed around the kernel call.

No grpc here. The kernel module is passed in (``coding_ext`` by default,
``coding_ext.reference`` for the numpy reference), so the service computes
exactly what an in-process caller of the same module gets.

Timing: ``encode_us``/``decode_us`` are measured with ``perf_counter_ns``
around the kernel call only (inside the executor thread), excluding
(de)serialisation and executor hand-off, so they compare with the same call
made in-process.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.common.errors import InvalidInput

ENCODERS = ("sum", "concat")


def load_kernels(name="native"):
    """``coding_ext`` ("native") or ``coding_ext.reference`` ("reference")."""
    import importlib

    module = importlib.import_module("coding_ext" if name == "native" else "coding_ext.reference")
    missing = [f for f in ("sum_encode", "concat_encode", "subtract_decode") if not hasattr(module, f)]
    if missing:
        raise ImportError(f"{module.__name__} lacks {', '.join(missing)} (is coding_ext built?)")
    return module


def _same_layout(arrays, what):
    first = arrays[0]
    for i, a in enumerate(arrays[1:], start=1):
        if a.dtype != first.dtype:
            raise InvalidInput(f"{what}[{i}]: dtype {a.dtype.name} differs from {what}[0]'s {first.dtype.name}")
        if a.shape != first.shape:
            raise InvalidInput(f"{what}[{i}]: shape {list(a.shape)} differs from {what}[0]'s {list(first.shape)}")


class CoderCore:
    """Encoder and decoder; ``workers`` threads run the kernels off the event loop."""

    def __init__(self, kernels, *, workers=1):
        self.kernels = kernels
        self._executor = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="coder")

    async def encode(self, encoder, inputs, scale=None, shift=None):
        """Encodes k batches into one parity batch.

        Args:
            encoder: "sum" | "concat".
            inputs: k >= 2 ndarrays of shape (B, *S), one dtype.
            scale, shift: optional per-channel affine (sum only), len C each.

        Returns:
            (parity ndarray, encode_us).
        """
        if encoder not in ENCODERS:
            raise InvalidInput(f"encoder {encoder!r} not in {ENCODERS}")
        if len(inputs) < 2:
            raise InvalidInput(f"encode needs k >= 2 inputs, got {len(inputs)}")
        _same_layout(inputs, "inputs")
        if encoder == "concat" and (scale or shift):
            raise InvalidInput("scale/shift apply to the sum encoder only")
        if encoder == "sum":
            kwargs = {}
            if scale:
                kwargs["scale"] = np.asarray(scale, dtype=np.float32)
            if shift:
                kwargs["shift"] = np.asarray(shift, dtype=np.float32)
            return await self._timed(self.kernels.sum_encode, list(inputs), **kwargs)
        return await self._timed(self.kernels.concat_encode, list(inputs))

    async def decode(self, parity_output, available):
        """Reconstructs the one missing output: parity_output - sum(available).

        Args:
            parity_output: ndarray (B, *O).
            available: the k-1 outputs that arrived, each (B, *O), same dtype.

        Returns:
            (reconstruction ndarray, decode_us).
        """
        if not available:
            raise InvalidInput("decode needs at least one available output (k - 1 >= 1)")
        _same_layout([parity_output, *available], "outputs (parity_output first)")
        return await self._timed(self.kernels.subtract_decode, parity_output, list(available))

    async def _timed(self, fn, *args, **kwargs):
        def call():
            start = time.perf_counter_ns()
            try:
                out = fn(*args, **kwargs)
            except InvalidInput:
                raise
            except (ValueError, TypeError) as exc:
                raise InvalidInput(str(exc)) from None
            return out, (time.perf_counter_ns() - start) / 1000.0

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)
