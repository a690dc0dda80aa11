"""The coder's buffer ownership: pooled outputs, serialised inside the job, always returned.

In-process (no sockets): the servicer and ``CoderCore`` called directly, with
kernels that can be made to block so that cancellation and exhaustion land at
a known point.
"""

import asyncio
import threading
import time

import numpy as np
import pytest

import coding_ext
from coding_ext import Kernels, load_kernels
from parm.v1 import coder_pb2 as pb
from services.coder.core import CoderCore
from services.coder.servicer import CoderServicer
from services.common import tensors
from services.common.errors import InvalidInput, Overloaded


class SpyKernels(Kernels):
    """The native kernels, recording each ``out`` address; ``gate`` (if set) blocks the call."""

    __slots__ = ("outs", "calls", "entered", "gate")

    def __init__(self):
        native = load_kernels("native")
        super().__init__("spy", "spy", self._wrap(native.sum_encode), self._wrap(native.concat_encode),
                         self._wrap(native.subtract_decode))
        self.outs, self.calls = [], 0
        self.entered = threading.Event()
        self.gate = None

    def _wrap(self, fn):
        def call(*args, **kwargs):
            self.calls += 1
            out = args[-1]
            self.outs.append(None if out is None else out.ctypes.data)
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(10)
            return fn(*args, **kwargs)
        return call


def _arrays(k, shape, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(k)]


def _request(arrays, encoder="sum"):
    return pb.EncodeRequest(encoder=encoder, inputs=[tensors.to_proto(a) for a in arrays])


async def _wait_until(predicate, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


def test_reply_is_not_touched_when_its_buffer_is_reused():
    """Two calls share one buffer; the first reply still holds the first parity."""
    spy = SpyKernels()
    core = CoderCore(spy, workers=1)
    servicer = CoderServicer(core)
    a, b = _arrays(2, (4, 3, 8, 8), 1), _arrays(2, (4, 3, 8, 8), 2)

    async def body():
        first = await servicer.Encode(_request(a), None)
        second = await servicer.Encode(_request(b), None)
        return first, second

    first, second = asyncio.run(body())
    assert spy.outs[0] == spy.outs[1] is not None  # the same pooled memory, twice
    assert core.outputs.available == 1 and core.outputs.hits == 2
    np.testing.assert_array_equal(tensors.from_proto(first.parity), coding_ext.sum_encode(a))
    np.testing.assert_array_equal(tensors.from_proto(second.parity), coding_ext.sum_encode(b))
    assert first.encode_us > 0
    core.close()


def test_decode_through_the_pool():
    core = CoderCore(load_kernels("native"), workers=1)
    servicer = CoderServicer(core)
    outputs = _arrays(3, (5, 10), 3)
    parity = coding_ext.sum_encode(outputs)
    request = pb.DecodeRequest(parity_output=tensors.to_proto(parity),
                               available_outputs=[tensors.to_proto(o) for o in outputs[1:]])
    reply = asyncio.run(servicer.Decode(request, None))
    np.testing.assert_array_equal(tensors.from_proto(reply.reconstruction),
                                  coding_ext.subtract_decode(parity, outputs[1:]))
    assert core.outputs.hits == 1 and core.outputs.available == 1
    core.close()


def test_default_result_is_a_copy_not_the_pooled_buffer():
    spy = SpyKernels()
    core = CoderCore(spy, workers=1)
    xs = _arrays(2, (2, 6), 4)
    parity, _ = asyncio.run(core.encode("sum", xs))
    assert parity.ctypes.data != spy.outs[0]
    np.testing.assert_array_equal(parity, coding_ext.sum_encode(xs))
    core.close()


def test_cancelled_while_running_releases_when_the_kernel_ends():
    spy = SpyKernels()
    spy.gate = threading.Event()
    core = CoderCore(spy, workers=1)

    async def body():
        task = asyncio.ensure_future(core.encode("sum", _arrays(2, (2, 8), 5)))
        await _wait_until(spy.entered.is_set)
        assert core.outputs.available == 0     # the running job holds the buffer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert core.outputs.available == 0     # still the kernel's: not reused under it
        spy.gate.set()
        await _wait_until(lambda: core.outputs.available == 1)

    asyncio.run(body())
    assert spy.calls == 1
    core.close()


def test_cancelled_while_queued_never_leases():
    spy = SpyKernels()
    spy.gate = threading.Event()
    core = CoderCore(spy, workers=1)

    async def body():
        running = asyncio.ensure_future(core.encode("sum", _arrays(2, (2, 8), 6)))
        await _wait_until(spy.entered.is_set)
        queued = asyncio.ensure_future(core.encode("sum", _arrays(2, (2, 8), 7)))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        spy.gate.set()
        await running

    asyncio.run(body())
    assert spy.calls == 1                     # the queued job never ran its kernel
    assert (core.outputs.hits, core.outputs.available) == (1, 1)
    core.close()


def test_errors_release_the_buffer():
    core = CoderCore(load_kernels("native"), workers=1)

    def broken_sink(parity):
        raise RuntimeError("sink failed")

    async def body():
        with pytest.raises(InvalidInput, match="concat_encode supports k = 2 or 4"):
            await core.encode("concat", _arrays(3, (1, 1, 4, 4), 8))
        with pytest.raises(RuntimeError, match="sink failed"):
            await core.encode("sum", _arrays(2, (2, 2), 9), into=broken_sink)

    asyncio.run(body())
    assert core.outputs.available == 1 and core.outputs.hits == 2
    core.close()


def test_exhausted_pool_is_overloaded_not_an_allocation():
    """Fewer buffers than threads: a job that finds none within pool_wait_s fails."""
    spy = SpyKernels()
    spy.gate = threading.Event()
    core = CoderCore(spy, workers=2, pool_buffers=1, pool_wait_s=0.05)

    async def body():
        held = asyncio.ensure_future(core.encode("sum", _arrays(2, (2, 8), 10)))
        await _wait_until(spy.entered.is_set)
        with pytest.raises(Overloaded, match="coder: all 1 buffers"):
            await core.encode("sum", _arrays(2, (2, 8), 11))
        spy.gate.set()
        return await held

    parity, _ = asyncio.run(body())
    np.testing.assert_array_equal(parity, coding_ext.sum_encode(_arrays(2, (2, 8), 10)))
    assert spy.calls == 1 and core.outputs.available == 1
    core.close()


def test_default_pool_never_waits_under_concurrency():
    """One buffer per kernel thread: many concurrent calls, no waits, all correct."""
    workers = 2
    core = CoderCore(load_kernels("native"), workers=workers, pool_wait_s=0)
    inputs = [_arrays(2, (3, 50), 20 + i) for i in range(24)]

    async def body():
        return await asyncio.gather(*(core.encode("sum", xs) for xs in inputs))

    results = asyncio.run(body())
    for xs, (parity, _) in zip(inputs, results):
        np.testing.assert_array_equal(parity, coding_ext.sum_encode(xs))
    assert core.outputs.count == workers
    assert (core.outputs.hits, core.outputs.available) == (24, workers)
    core.close()


def test_oversized_output_is_allocated_for_that_call():
    spy = SpyKernels()
    core = CoderCore(spy, workers=1, pool_buffer_bytes=64)
    xs = _arrays(2, (2, 9), 12)  # 72 bytes
    parity, _ = asyncio.run(core.encode("sum", xs))
    np.testing.assert_array_equal(parity, coding_ext.sum_encode(xs))
    assert (core.outputs.hits, core.outputs.misses) == (0, 1)
    core.close()


def test_pool_off_lets_the_kernel_allocate():
    spy = SpyKernels()
    core = CoderCore(spy, workers=1, pool_buffers=0)
    assert core.outputs is None
    xs = _arrays(2, (2, 9), 13)
    parity, _ = asyncio.run(core.encode("sum", xs))
    assert spy.outs == [None]
    np.testing.assert_array_equal(parity, coding_ext.sum_encode(xs))
    core.close()


def test_reference_kernels_write_into_the_pool_too():
    core = CoderCore(load_kernels("reference"), workers=1)
    xs = _arrays(4, (1, 2, 4, 4), 14)
    parity, _ = asyncio.run(core.encode("concat", xs))
    np.testing.assert_array_equal(parity, coding_ext.concat_encode(xs))
    assert core.outputs.hits == 1
    core.close()
