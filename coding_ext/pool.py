"""Pools of aligned, page-locked buffers for parity queries and reconstructions.

``BufferPool`` lends buffers of one fixed shape; ``OutputPool`` lends output
arrays of any shape and dtype up to a byte capacity (views over a
``BufferPool`` of bytes), for services whose tensor shapes arrive with the
request.
"""

import collections
import contextlib
import ctypes
import ctypes.util
import mmap
import threading
import time
import warnings

import numpy as np

__all__ = ["BufferPool", "OutputPool", "PoolExhausted"]


class PoolExhausted(RuntimeError):
    """No buffer became free within the timeout given to BufferPool.acquire."""


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mlock.argtypes = lib.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mlock.restype = lib.munlock.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


def _mlock(address, nbytes):
    """Locks [address, address + nbytes) in RAM; returns None or why it failed."""
    lib = _libc()
    if lib is None:
        return "no mlock in this C library"
    if lib.mlock(ctypes.c_void_p(address), ctypes.c_size_t(nbytes)) != 0:
        errno = ctypes.get_errno()
        return f"mlock failed: errno {errno} ({__import__('os').strerror(errno)})"
    return None


def _munlock(address, nbytes):
    lib = _libc()
    if lib is not None:
        lib.munlock(ctypes.c_void_p(address), ctypes.c_size_t(nbytes))


class BufferPool:
    """A fixed set of preallocated, aligned, page-locked ndarrays, reused.

    All buffers live in one anonymous memory mapping, each starting on an
    `alignment`-byte boundary (a page by default) so the kernels' vector
    stores never straddle one. The mapping is locked in RAM with mlock(2)
    where the OS allows it (`locked` says whether it is); where it does not
    (no permission, RLIMIT_MEMLOCK too small, no libc), the pool warns once
    and works with ordinary pages, touched once up front so that no page
    fault lands on the serving path.

    Ownership protocol:
        - `acquire(timeout_s)` hands out one free buffer: an ndarray of
          `shape` and `dtype`, C-contiguous, writable. From then on the
          caller owns it exclusively; its contents are whatever its last
          owner left (the kernels overwrite every element).
        - `release(buf)` gives it back. Pass the very object acquire returned
          (not a view or copy); releasing a buffer that is not currently out,
          or that belongs to another pool, raises ValueError. After release
          the caller must not touch it or any view of it: the next acquire
          may hand it to another thread.
        - When every buffer is out, acquire waits until one is released
          (FIFO among waiters is not guaranteed). `timeout_s=None` waits
          forever, `timeout_s=0` never waits; when the timeout passes, acquire
          raises PoolExhausted. The pool never grows: exhaustion is back
          pressure, to be turned into RESOURCE_EXHAUSTED by a service.
        - `lease(timeout_s)` is a context manager doing acquire/release.
        - acquire and release are thread-safe and allocate nothing: the
          ndarray objects are created once, in the constructor.
        - `close()` unlocks the memory; every buffer must be released first.

    Args:
        shape: shape of each buffer, e.g. (B, C, H, W).
        count: number of buffers, >= 1.
        dtype: numpy dtype of the buffers (default float32).
        alignment: byte alignment of each buffer, a power of two between 64
            and the page size (default: the page size).
        lock: try to mlock the memory (default True).
    """

    def __init__(self, shape, count, dtype=np.float32, *, alignment=None, lock=True):
        try:
            self.shape = tuple(int(d) for d in shape)
        except TypeError:
            raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape must have no negative dimension, got {self.shape}")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        count = int(count)
        self.dtype = np.dtype(dtype)
        page = mmap.PAGESIZE
        alignment = page if alignment is None else alignment
        if (not isinstance(alignment, int) or alignment < 64 or alignment > page
                or alignment & (alignment - 1)):
            raise ValueError(
                f"alignment must be a power of two in [64, {page}], got {alignment!r}"
            )
        self.alignment = alignment
        self.count = count
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        stride = max(alignment, -(-self.nbytes // alignment) * alignment)
        self._map_bytes = -(-stride * count // page) * page
        self._map = mmap.mmap(-1, self._map_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = np.frombuffer(self._map, dtype=np.uint8)
        self._address = raw.ctypes.data
        self._buffers = [
            raw[i * stride : i * stride + self.nbytes].view(self.dtype).reshape(self.shape)
            for i in range(count)
        ]
        del raw
        self._index = {id(b): i for i, b in enumerate(self._buffers)}
        reason = _mlock(self._address, self._map_bytes) if lock else "locking not requested"
        self.locked = reason is None
        if lock and not self.locked:
            warnings.warn(
                f"BufferPool: could not lock {self._map_bytes} bytes in RAM ({reason}); "
                "using ordinary pages",
                RuntimeWarning,
                stacklevel=2,
            )
        if not self.locked:
            for b in self._buffers:
                b.view(np.uint8).reshape(-1)[:] = 0  # fault every page in now
        self._free = collections.deque(range(count))
        self._out = [False] * count
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    @property
    def available(self):
        """How many buffers are free right now (a snapshot)."""
        with self._cond:
            return len(self._free)

    def acquire(self, timeout_s=None):
        """Takes a free buffer, waiting up to timeout_s (None: forever).

        Returns:
            ndarray of `shape` and `dtype`, C-contiguous, writable, owned by
            the caller until `release`.

        Raises:
            PoolExhausted: no buffer was released within timeout_s.
            ValueError: the pool is closed, or timeout_s is negative.
        """
        if timeout_s is not None and timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s!r}")
        with self._cond:
            if not self._free and timeout_s != 0:
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                while not self._free and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._closed:
                raise ValueError("BufferPool is closed")
            if not self._free:
                raise PoolExhausted(
                    f"all {self.count} buffers of shape {self.shape} are in use "
                    f"(waited {timeout_s} s)"
                )
            i = self._free.popleft()
            self._out[i] = True
            return self._buffers[i]

    def release(self, buf):
        """Gives back a buffer returned by acquire; the caller must not use it after."""
        i = self._index.get(id(buf))
        if i is None or self._buffers[i] is not buf:
            raise ValueError("release() got an array that is not a buffer of this pool "
                             "(pass the exact object acquire() returned)")
        with self._cond:
            if not self._out[i]:
                raise ValueError("release() of a buffer that is not acquired (double release?)")
            self._out[i] = False
            self._free.append(i)
            self._cond.notify()

    @contextlib.contextmanager
    def lease(self, timeout_s=None):
        """Context manager: acquire on entry, release on exit."""
        buf = self.acquire(timeout_s)
        try:
            yield buf
        finally:
            self.release(buf)

    def close(self):
        """Unlocks the memory and wakes waiters; every buffer must have been released."""
        with self._cond:
            if self._closed:
                return
            if len(self._free) != self.count:
                raise ValueError(
                    f"close() with {self.count - len(self._free)} buffers still acquired"
                )
            self._closed = True
            self._cond.notify_all()
        if self.locked:
            _munlock(self._address, self._map_bytes)
            self.locked = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"BufferPool(shape={self.shape}, count={self.count}, dtype={self.dtype}, "
                f"alignment={self.alignment}, locked={self.locked})")


class OutputPool:
    """Output arrays of any shape and dtype up to ``capacity_bytes``, lent from a pool.

    ``count`` buffers of ``capacity_bytes`` live in one ``BufferPool`` of
    bytes (page-aligned, page-locked where the OS allows). ``lease(shape,
    dtype)`` yields a view of the first ``nbytes`` of one of them, shaped as
    asked: C-contiguous, writable, aligned to a page, so the kernels can
    write into it with ``out=``.

    Ownership (what callers rely on, and what the tests check):
        - Inside ``with pool.lease(shape) as out:`` the caller owns ``out``
          exclusively; its contents are whatever the last lessee left.
        - The buffer returns to the pool when the ``with`` block exits,
          however it exits: normally, by an exception, or by cancellation (a
          ``CancelledError`` or ``KeyboardInterrupt`` raised inside the block
          unwinds through the same ``finally``). A block that never starts
          (a job cancelled while queued) never acquires.
        - After the block, ``out`` and every view of it may be overwritten by
          the next lessee at any time. Whatever must outlive the block (a
          reply, a protobuf message, a result handed to another task) must
          hold a copy made inside it. ``tensors.to_proto`` makes that copy.
        - An array larger than ``capacity_bytes`` is not pooled: it is
          allocated (``np.empty``), counted in ``misses``, and freed by the
          garbage collector like any array. Pooled leases count in ``hits``.
        - When every buffer is out, ``lease`` waits up to ``timeout_s``
          (None: forever, 0: not at all) and then raises ``PoolExhausted``;
          it never allocates instead. A service turns that into
          RESOURCE_EXHAUSTED. Sizing the pool at one buffer per thread that
          can hold a lease makes exhaustion impossible.

    Args:
        capacity_bytes: size of each buffer, >= 1.
        count: number of buffers, >= 1.
        lock: try to mlock the memory (default True).
    """

    def __init__(self, capacity_bytes, count, *, lock=True):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, (int, np.integer)) \
                or capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be an int >= 1, got {capacity_bytes!r}")
        self.capacity_bytes = int(capacity_bytes)
        self._pool = BufferPool((self.capacity_bytes,), count, np.uint8, lock=lock)
        self.count = self._pool.count
        self.hits = 0
        self.misses = 0
        self._stats = threading.Lock()

    @property
    def locked(self):
        """Whether the buffers are locked in RAM."""
        return self._pool.locked

    @property
    def available(self):
        """How many buffers are free right now (a snapshot)."""
        return self._pool.available

    @contextlib.contextmanager
    def lease(self, shape, dtype=np.float32, timeout_s=None):
        """Context manager: an ndarray of ``shape``/``dtype`` owned until the block exits.

        Raises:
            PoolExhausted: every buffer stayed out for timeout_s.
            ValueError: negative dimension, or the pool is closed.
        """
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must have no negative dimension, got {shape}")
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self.capacity_bytes:
            with self._stats:
                self.misses += 1
            yield np.empty(shape, dtype)
            return
        buf = self._pool.acquire(timeout_s)
        try:
            with self._stats:
                self.hits += 1
            yield buf[:nbytes].view(dtype).reshape(shape)
        finally:
            self._pool.release(buf)

    def close(self):
        """Unlocks the memory; every lease must have ended."""
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"OutputPool(capacity_bytes={self.capacity_bytes}, count={self.count}, "
                f"locked={self.locked}, hits={self.hits}, misses={self.misses})")
