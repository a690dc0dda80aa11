"""Coding core of ParM: encoders, decoder and buffer pool.

    from coding_ext import sum_encode, concat_encode, subtract_decode, BufferPool, reference

The three kernels come from the release build (`coding_ext._kernels`);
`coding_ext.debug` exposes the same API over the bounds-checked build, and
`coding_ext.reference` holds the plain numpy definitions. See
docs/coding_ext.md.
"""

from coding_ext import reference
from coding_ext._kernels import (
    BUILD,
    MAX_K,
    NOGIL_MIN_BYTES,
    concat_encode,
    subtract_decode,
    sum_encode,
)
from coding_ext.pool import BufferPool, PoolExhausted

__all__ = [
    "BUILD",
    "BufferPool",
    "MAX_K",
    "NOGIL_MIN_BYTES",
    "PoolExhausted",
    "concat_encode",
    "reference",
    "subtract_decode",
    "sum_encode",
]
