"""Pinned buffers on the coded path (``coding.CodingPools``): who owns a buffer when.

Fakes and the injected ManualClock. Every test checks the pool's books: a
buffer is never handed out while a group (or an executor job) still holds it,
and every buffer is back once its owner is done: the group finished or was
abandoned, the original won, the task was cancelled, the kernel failed.
"""

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest

from services.frontend.coding import CodingPools, LocalCoder
from services.frontend.records import ORIGINAL, RECONSTRUCTED
from services.frontend.redundancy import Lateness
from tests.frontend.fakes import IN_SHAPE, OUT_SHAPE, linear, settle
from tests.frontend.test_engine import make_engine, x

pytestmark = pytest.mark.timeout(30)


def pools(count=2, batch_size=1):
    return CodingPools((batch_size, *IN_SHAPE), (batch_size, *OUT_SHAPE), count, lock=False)


def held(e):
    """Pooled buffers referenced by the engine's open groups, by kind."""
    out = {"parity": [], "reconstruction": []}
    for g in e.groups.values():
        if g.parity is not None and g.parity.buffer is not None:
            out["parity"].append(g.parity.buffer)
        if g.rec_buffer is not None:
            out["reconstruction"].append(g.rec_buffer)
    return out


def check_books(e, p):
    """No buffer is referenced twice, and referenced + free = all of them."""
    for kind, bufs in held(e).items():
        assert len({id(b) for b in bufs}) == len(bufs), f"{kind} buffer shared by two groups"
        assert len(bufs) + p.available(kind) == p.count, (kind, len(bufs), p.available(kind))


async def test_parity_encoded_into_a_pool_buffer_owned_until_the_group_finishes():
    p = pools(count=2)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p)
    qs = [e.submit(x(i)) for i in range(4)]          # groups 0 and 1
    await settle()
    g0, g1 = e.groups[0], e.groups[1]
    assert g0.parity.buffer is g0.parity.inputs and g1.parity.buffer is g1.parity.inputs
    assert g0.parity.buffer is not g1.parity.buffer
    np.testing.assert_array_equal(g0.parity.inputs, (x(0) + x(1))[None])
    np.testing.assert_array_equal(g1.parity.inputs, (x(2) + x(3))[None])
    assert p.available("parity") == 0 and p.hits["parity"] == 2
    check_books(e, p)
    # group 0's data answer; its parity, still in flight, keeps its buffer
    fleet["d0:1"].release(0)
    fleet["d1:1"].release(1)
    await settle()
    assert [q.future.result().source for q in qs[:2]] == [ORIGINAL, ORIGINAL]
    assert 0 in e.groups and p.available("parity") == 0
    fleet["p0:1"].release(2)                         # the parity call ends: the group finishes
    await settle()
    assert 0 not in e.groups and p.available("parity") == 1
    check_books(e, p)
    await e.close()                                  # group 1 is abandoned: its buffer goes back too
    assert p.available("parity") == 2 and not e.groups
    await p.close()


async def test_exhausted_pool_falls_back_to_allocating_and_counts_a_miss():
    p = pools(count=1)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p)
    qs = [e.submit(x(i)) for i in range(4)]
    await settle()
    g0, g1 = e.groups[0], e.groups[1]
    assert g0.parity.buffer is not None and g1.parity.buffer is None      # the second one allocated
    assert p.misses["parity"] == 1 and e.counters["coding_pool_misses"] == 1
    np.testing.assert_array_equal(g1.parity.inputs, (x(2) + x(3))[None])
    for _ in range(4):                          # every call answers: originals, no decode
        for c in ("d0:1", "d1:1", "p0:1"):
            while fleet[c].pending:
                fleet[c].release()
        await settle()
    for i, q in enumerate(qs):
        np.testing.assert_array_equal(q.future.result().output, linear(x(i)[None])[0])
    assert not e.groups and p.available("parity") == 1
    await e.close()
    await p.close()


async def test_reconstruction_owned_by_the_group_answers_are_copies_late_original_releases():
    p = pools(count=2)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p)
    qs = [e.submit(x(i)) for i in range(2)]
    await settle()
    fleet["d1:1"].release(1)
    fleet["p0:1"].release(2)
    await settle()
    g = e.groups[0]
    a = qs[0].future.result()
    assert a.source == RECONSTRUCTED
    np.testing.assert_allclose(a.output, linear(x(0)[None])[0], rtol=1e-5, atol=1e-5)
    assert g.rec_buffer is not None and p.available("reconstruction") == 1
    assert not np.shares_memory(a.output, g.rec_buffer), "an answer must not view a pooled buffer"
    g.rec_buffer[:] = -1.0                      # the next owner overwrites it: the answer keeps its value
    np.testing.assert_allclose(a.output, linear(x(0)[None])[0], rtol=1e-5, atol=1e-5)
    check_books(e, p)
    fleet["d0:1"].release(0)                    # the late original is scored, then the buffer goes back
    await settle()
    assert e.counters["late_originals"] == 1 and not e.groups
    assert p.available("reconstruction") == 2 and p.available("parity") == 2
    await e.close()
    await p.close()


async def test_original_winning_over_a_held_reconstruction_releases_it_at_once():
    p = pools(count=2)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p,
                                  lateness=Lateness("late", initial_s=0.05))
    qs = [e.submit(x(i), timeout_s=5.0) for i in range(2)]
    await settle()
    fleet["d1:1"].release(1)
    fleet["p0:1"].release(2)
    await settle()
    g = e.groups[0]
    assert e.counters["held_for_lateness"] == 1 and g.rec_buffer is not None
    assert p.available("reconstruction") == 1
    fleet["d0:1"].release(0)                    # before the threshold: the original answers
    await settle()
    assert qs[0].future.result().source == ORIGINAL
    assert e.counters["substitutes_discarded"] == 1
    assert p.available("reconstruction") == 2 and g.rec_buffer is None
    await e.close()
    await p.close()


async def test_gc_abandon_returns_the_buffers():
    p = pools(count=2)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p, gc_interval_s=1.0,
                                  query_timeout_s=1.0, instance_timeout_s=0.5, max_attempts=1)
    e.start()
    [e.submit(x(i)) for i in range(2)]
    await settle()
    fleet["d1:1"].release(1)
    fleet["p0:1"].release(2)
    await settle()
    g = e.groups[0]
    assert g.rec_buffer is not None and g.parity.buffer is not None
    g.members[0].calls += 1                     # a call that never ends keeps the group open
    clock.advance(e.gc_horizon_s + 2.0)
    await settle()
    assert e.counters["groups_abandoned"] == 1 and not e.groups
    assert p.available("parity") == 2 and p.available("reconstruction") == 2
    g.members[0].calls -= 1
    await e.close()
    await p.close()


class FailingCoder(LocalCoder):
    """The native kernels, but the encode or the decode raises."""

    def __init__(self, fail, **kw):
        super().__init__("sum", **kw)
        self.fail = fail

    def encode_now(self, inputs, out=None):
        if self.fail == "encode":
            raise RuntimeError("encoder broke")
        return super().encode_now(inputs, out)

    def decode_now(self, parity_output, available, out=None):
        if self.fail == "decode":
            raise RuntimeError("decoder broke")
        return super().decode_now(parity_output, available, out)


@pytest.mark.parametrize("executor", [False, True])
@pytest.mark.parametrize("fail", ["encode", "decode"])
async def test_a_failed_kernel_returns_its_buffer_at_once(fail, executor):
    p = pools(count=2)
    pool = concurrent.futures.ThreadPoolExecutor(1) if executor else None
    coder = FailingCoder(fail, executor=pool, inline_max_bytes=0)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p, coder=coder)
    [e.submit(x(i)) for i in range(2)]
    for _ in range(200):
        await asyncio.sleep(0.002)
        if e.counters["encode_errors"] or e.counters["encodes"]:
            break
    if fail == "decode":
        fleet["d1:1"].release(1)
        fleet["p0:1"].release(2)
        for _ in range(200):
            await asyncio.sleep(0.002)
            if e.counters["decode_errors"]:
                break
    assert e.counters[f"{fail}_errors"] == 1
    assert p.available("parity" if fail == "encode" else "reconstruction") == 2
    await e.close()
    assert p.available("parity") == 2 and p.available("reconstruction") == 2
    await p.close()
    if pool is not None:
        pool.shutdown()


class GatedCoder(LocalCoder):
    """Native kernels in the executor that wait for ``gate`` before writing."""

    def __init__(self, executor):
        super().__init__("sum", executor=executor, inline_max_bytes=0)
        self.gate = threading.Event()
        self.started = threading.Event()

    def encode_now(self, inputs, out=None):
        self.started.set()
        assert self.gate.wait(10)
        return super().encode_now(inputs, out)


async def test_cancelled_encode_keeps_its_buffer_until_the_kernel_returns():
    p = pools(count=2)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    coder = GatedCoder(pool)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p, coder=coder)
    [e.submit(x(i)) for i in range(2)]
    for _ in range(500):
        await asyncio.sleep(0.002)
        if coder.started.is_set():
            break
    assert coder.started.is_set() and p.available("parity") == 1
    await e.close()                 # cancels the encode task and abandons the group ...
    assert not e.groups
    assert p.available("parity") == 1, "released while the kernel may still write into it"
    coder.gate.set()                # ... the kernel returns: now the buffer goes back
    await p.close()
    assert p.available("parity") == 2
    pool.shutdown()


async def test_buffers_are_never_shared_under_random_events():
    rng = np.random.default_rng(7)
    p = pools(count=3)
    e, clock, fleet = make_engine("coded", data=2, parity=1, pools=p, max_attempts=1,
                                  instance_timeout_s=0.5)
    qs = []
    for step in range(300):
        r = rng.random()
        if r < 0.4:
            qs.append(e.submit(x(step % 7), timeout_s=2.0))
        elif r < 0.85:
            c = fleet[("d0:1", "d1:1", "p0:1")[rng.integers(3)]]
            if c.pending:
                (c.release if rng.random() < 0.8 else c.fail)()
        else:
            clock.advance(0.1)
        await settle(3)
        check_books(e, p)
    for c in ("d0:1", "d1:1", "p0:1"):
        while fleet[c].pending:
            fleet[c].release()
            await settle(3)
    clock.advance(5.0)
    await settle()
    assert all(q.done for q in qs)
    assert p.hits["parity"] >= 3 and p.misses["parity"] + p.hits["parity"] == e.counters["encodes"]
    for q in qs:
        if q.future.done() and not q.future.cancelled() and q.future.exception() is None:
            a = q.future.result()
            if a.source == RECONSTRUCTED:
                assert not any(np.shares_memory(a.output, b) for b in p.pools["reconstruction"]._buffers)
    await e.close()
    assert p.available("parity") == 3 and p.available("reconstruction") == 3
    await p.close()


def test_local_coder_is_the_native_kernels_and_writes_into_out():
    import coding_ext

    c = LocalCoder("sum")
    assert c._encode is coding_ext.sum_encode and c._decode is coding_ext.subtract_decode
    assert LocalCoder("concat")._encode is coding_ext.concat_encode
    with pytest.raises(ValueError, match="unknown encoder 'xor'"):
        LocalCoder("xor")
    out = np.full((1, 4), np.nan, np.float32)
    assert c.encode_now([x(0)[None], x(1)[None]], out) is out
    np.testing.assert_array_equal(out, (x(0) + x(1))[None])
    rec = np.full((1, 3), np.nan, np.float32)
    assert c.decode_now(linear((x(0) + x(1))[None]), [linear(x(1)[None])], rec) is rec
    np.testing.assert_allclose(rec, linear(x(0)[None]), rtol=1e-5, atol=1e-5)
