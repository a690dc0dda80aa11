"""Coding core of ParM: encoders, decoder and buffer pools.

    from coding_ext import sum_encode, concat_encode, subtract_decode, BufferPool, reference
    kernels = coding_ext.load_kernels("native")      # the one way services choose an implementation

The three kernels come from the release build (`coding_ext._kernels`);
`coding_ext.debug` exposes the same API over the bounds-checked build, and
`coding_ext.reference` holds the plain numpy definitions. `load_kernels`
picks one of the three by name (`coding_ext.loader`). `OutputPool` lends
pooled output arrays of any shape up to a capacity. See docs/coding_ext.md.
"""

try:
    from coding_ext._kernels import (
        BUILD,
        MAX_K,
        NOGIL_MIN_BYTES,
        concat_encode,
        subtract_decode,
        sum_encode,
    )
except ImportError as exc:  # the Cython extension is built by `make build`, never optional
    raise ImportError(f"coding_ext._kernels is not built ({exc}); run `make build`") from exc

from coding_ext import reference
from coding_ext.loader import ENCODERS, KERNELS, Kernels, load_kernels
from coding_ext.pool import BufferPool, OutputPool, PoolExhausted

__all__ = [
    "BUILD",
    "BufferPool",
    "ENCODERS",
    "KERNELS",
    "Kernels",
    "MAX_K",
    "NOGIL_MIN_BYTES",
    "OutputPool",
    "PoolExhausted",
    "concat_encode",
    "load_kernels",
    "reference",
    "subtract_decode",
    "sum_encode",
]
