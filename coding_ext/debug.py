"""The coding API over the bounds-checked build (`coding_ext._kernels_debug`).

Same functions and behaviour as `coding_ext`, with Cython's bounds,
wraparound, None and initialisation checks on; the kernel tests run against
both builds.
"""

from coding_ext import (  # noqa: F401
    ENCODERS,
    KERNELS,
    BufferPool,
    Kernels,
    OutputPool,
    PoolExhausted,
    __all__,
    load_kernels,
    reference,
)
from coding_ext._kernels_debug import (  # noqa: F401
    BUILD,
    MAX_K,
    NOGIL_MIN_BYTES,
    concat_encode,
    subtract_decode,
    sum_encode,
)
