"""The coding API over the bounds-checked build (`coding_ext._kernels_debug`).

Same functions and behaviour as `coding_ext`, with Cython's bounds,
wraparound, None and initialisation checks on; the kernel tests run against
both builds.
"""

from coding_ext import reference
from coding_ext._kernels_debug import (
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
