"""BufferPool: alignment, locking (and its fallback), the ownership protocol, threads."""

import threading
import time
import warnings

import numpy as np
import pytest

import coding_ext
from coding_ext import BufferPool, OutputPool, PoolExhausted
from coding_ext import pool as pool_module


def test_buffers_are_aligned_distinct_writable():
    with BufferPool((2, 3, 5), count=4, alignment=256) as pool:
        bufs = [pool.acquire() for _ in range(4)]
        addresses = [b.ctypes.data for b in bufs]
        for b in bufs:
            assert b.shape == (2, 3, 5) and b.dtype == np.float32
            assert b.flags.c_contiguous and b.flags.writeable
            assert b.ctypes.data % 256 == 0
        assert len(set(addresses)) == 4
        for i, b in enumerate(bufs):
            b[...] = i
        for i, b in enumerate(bufs):
            assert (b == i).all()  # no two buffers share memory
        for b in bufs:
            pool.release(b)


def test_default_alignment_is_a_page():
    import mmap

    with BufferPool((10,), count=3, dtype=np.uint8) as pool:
        bufs = [pool.acquire() for _ in range(3)]
        assert all(b.ctypes.data % mmap.PAGESIZE == 0 for b in bufs)
        assert pool.alignment == mmap.PAGESIZE
        for b in bufs:
            pool.release(b)


def test_reuse_hands_back_the_same_object():
    """No per-call allocation: acquire returns one of the preallocated arrays."""
    with BufferPool((8,), count=1) as pool:
        first = pool.acquire()
        pool.release(first)
        again = pool.acquire()
        assert again is first
        pool.release(again)


def test_kernels_write_into_pool_buffers():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    with BufferPool((4, 3, 8, 8), count=2) as pool, pool.lease() as buf:
        assert coding_ext.sum_encode(xs, buf) is buf
        np.testing.assert_array_equal(buf, coding_ext.reference.sum_encode(xs))
        assert coding_ext.concat_encode(xs, buf) is buf
        np.testing.assert_array_equal(buf, coding_ext.reference.concat_encode(xs))


def test_exhausted_without_wait_raises():
    with BufferPool((4,), count=2) as pool:
        a, b = pool.acquire(), pool.acquire()
        assert pool.available == 0
        with pytest.raises(PoolExhausted, match="all 2 buffers"):
            pool.acquire(timeout_s=0)
        pool.release(a)
        pool.release(b)


def test_exhausted_with_timeout_waits_then_raises():
    with BufferPool((4,), count=1) as pool:
        held = pool.acquire()
        start = time.monotonic()
        with pytest.raises(PoolExhausted):
            pool.acquire(timeout_s=0.1)
        assert time.monotonic() - start >= 0.09
        pool.release(held)


def test_blocked_acquire_gets_the_released_buffer():
    with BufferPool((4,), count=1) as pool:
        held = pool.acquire()
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout_s=10)))
        waiter.start()
        time.sleep(0.05)
        assert got == []  # still waiting
        pool.release(held)
        waiter.join(5)
        assert not waiter.is_alive()
        assert got == [held]
        pool.release(got[0])


def test_release_errors():
    with BufferPool((4,), count=2) as pool, BufferPool((4,), count=1) as other:
        buf = pool.acquire()
        with pytest.raises(ValueError, match="not a buffer of this pool"):
            pool.release(np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="not a buffer of this pool"):
            pool.release(buf[:])  # a view, not the object acquire returned
        foreign = other.acquire()
        with pytest.raises(ValueError, match="not a buffer of this pool"):
            pool.release(foreign)
        other.release(foreign)
        pool.release(buf)
        with pytest.raises(ValueError, match="double release"):
            pool.release(buf)
        assert pool.available == 2


def test_close_protocol():
    pool = BufferPool((4,), count=2)
    buf = pool.acquire()
    with pytest.raises(ValueError, match="1 buffers still acquired"):
        pool.close()
    pool.release(buf)
    pool.close()
    assert not pool.locked
    with pytest.raises(ValueError, match="closed"):
        pool.acquire(timeout_s=0)
    pool.close()  # idempotent


def test_negative_timeout_rejected():
    with BufferPool((4,), count=1) as pool:
        with pytest.raises(ValueError, match="timeout_s"):
            pool.acquire(timeout_s=-1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (4,), "count": 0}, "count"),
        ({"shape": (4,), "count": 1.5}, "count"),
        ({"shape": (-1, 4), "count": 1}, "negative"),
        ({"shape": None, "count": 1}, "shape"),
        ({"shape": (4,), "count": 1, "alignment": 100}, "alignment"),
        ({"shape": (4,), "count": 1, "alignment": 32}, "alignment"),
        ({"shape": (4,), "count": 1, "alignment": 1 << 20}, "alignment"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BufferPool(**kwargs)


def test_locks_memory_where_allowed():
    """Here (root or enough RLIMIT_MEMLOCK) the pages are locked, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            pool = BufferPool((1024,), count=2)
        except RuntimeWarning:
            pytest.skip("this machine does not allow mlock")
    assert pool.locked
    pool.close()


def test_lock_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(pool_module, "_mlock", lambda address, nbytes: "mlock failed: errno 12")
    with pytest.warns(RuntimeWarning, match="could not lock") as record:
        pool = BufferPool((3, 1000), count=3)
    assert len(record) == 1
    assert not pool.locked
    with pool.lease() as buf:
        buf[...] = 7.0
        assert (buf == 7.0).all()
    pool.close()


def test_lock_false_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = BufferPool((16,), count=1, lock=False)
    assert not pool.locked
    pool.close()


def test_concurrent_use_from_threads():
    """Many threads, few buffers: no buffer is ever held twice, all come back."""
    count, n_threads, rounds = 3, 8, 150
    shape = (2, 64)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    expected = coding_ext.reference.sum_encode(xs)
    pool = BufferPool(shape, count=count)
    holders = {}
    guard = threading.Lock()
    errors = []
    max_out = [0]

    def work(tid):
        for _ in range(rounds):
            buf = pool.acquire(timeout_s=30)
            key = buf.ctypes.data
            with guard:
                if key in holders:
                    errors.append(f"buffer {key:#x} held by {holders[key]} and {tid}")
                holders[key] = tid
                max_out[0] = max(max_out[0], len(holders))
            buf.fill(tid)
            coding_ext.sum_encode(xs, buf)
            if not np.array_equal(buf, expected):
                errors.append(f"thread {tid} read a buffer another thread wrote")
            with guard:
                del holders[key]
            pool.release(buf)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert max_out[0] <= count
    assert pool.available == count
    pool.close()


# --- OutputPool: any shape up to a capacity


def test_output_pool_lends_shaped_aligned_views_of_pooled_memory():
    import mmap

    with OutputPool(4096 * 3, count=2) as pool:
        with pool.lease((2, 3, 5)) as a, pool.lease((7,), np.uint8) as b:
            assert a.shape == (2, 3, 5) and a.dtype == np.float32
            assert b.shape == (7,) and b.dtype == np.uint8
            for x in (a, b):
                assert x.flags.c_contiguous and x.flags.writeable
                assert x.ctypes.data % mmap.PAGESIZE == 0
            assert a.ctypes.data != b.ctypes.data
            assert pool.available == 0
        assert pool.available == 2
        assert (pool.hits, pool.misses) == (2, 0)


def test_output_pool_reuses_the_same_memory():
    with OutputPool(1024, count=1) as pool:
        with pool.lease((4,)) as first:
            address = first.ctypes.data
            first[...] = 1.0
        with pool.lease((2, 2)) as again:
            assert again.ctypes.data == address
            np.testing.assert_array_equal(again, np.ones((2, 2), np.float32))  # left by the last lessee


def test_output_pool_larger_than_capacity_is_allocated_and_counted():
    with OutputPool(64, count=1) as pool:
        with pool.lease((17,)) as big:  # 68 bytes
            assert big.shape == (17,)
            assert pool.available == 1  # no pooled buffer taken
        with pool.lease((16,)):         # exactly 64 bytes: pooled
            assert pool.available == 0
        assert (pool.hits, pool.misses) == (1, 1)


def test_output_pool_returns_the_buffer_on_error():
    with OutputPool(64, count=1) as pool:
        with pytest.raises(ZeroDivisionError):
            with pool.lease((4,)):
                assert pool.available == 0
                1 / 0
        assert pool.available == 1


def test_output_pool_exhaustion_raises_after_the_timeout_and_allocates_nothing():
    with OutputPool(64, count=1) as pool:
        with pool.lease((4,)):
            with pytest.raises(PoolExhausted, match="all 1 buffers"):
                with pool.lease((4,), timeout_s=0):
                    pass
            start = time.monotonic()
            with pytest.raises(PoolExhausted):
                with pool.lease((4,), timeout_s=0.05):
                    pass
            assert time.monotonic() - start >= 0.04
        assert (pool.hits, pool.misses, pool.available) == (1, 0, 1)


def test_output_pool_close_needs_every_lease_ended():
    pool = OutputPool(64, count=1)
    cm = pool.lease((2,))
    cm.__enter__()
    with pytest.raises(ValueError, match="1 buffers still acquired"):
        pool.close()
    cm.__exit__(None, None, None)
    pool.close()


@pytest.mark.parametrize("kwargs", [{"capacity_bytes": 0, "count": 1}, {"capacity_bytes": 1.5, "count": 1},
                                    {"capacity_bytes": 64, "count": 0}])
def test_output_pool_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        OutputPool(**kwargs)
