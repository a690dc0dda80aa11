# Kernel bodies, included by _kernels.pyx (release) and _kernels_debug.pyx
# (bounds-checked); compiler directives are set in setup.py.
#
# Three layers per kernel:
#   1. the C loops in _simd.h and a `cdef ... noexcept nogil` kernel here over
#      raw pointers, which never allocates and cannot fail;
#   2. the public `def` (sum_encode, concat_encode, subtract_decode), which
#      checks shapes, dtypes, contiguity, alignment and overlap, allocates
#      `out` when it is None, and enters `with nogil:` around layer 1;
#   3. the plain numpy reference in coding_ext/reference.py.
# Layer 2 reads arrays through the numpy C API rather than typed memoryviews:
# acquiring a memoryview costs a few hundred nanoseconds per operand, which on
# a 784-float query is more than the arithmetic. Read-only inputs (numpy
# arrays over protobuf bytes) are accepted; only `out` must be writable.

cimport numpy as cnp

cnp.import_array()

cdef extern from "_simd.h" nogil:
    ctypedef Py_ssize_t parm_idx
    int PARM_F32, PARM_F16, PARM_U8
    void parm_simd_init()
    const char *parm_simd_f16_name()
    const char *parm_simd_nt_name()
    Py_ssize_t PARM_NT_MIN_BYTES
    void parm_sum_encode(int dtype, const void *const *xs, int k, float *out,
                         parm_idx nblocks, parm_idx inner, parm_idx channels,
                         const float *scale, const float *shift)
    void parm_subtract_decode(const float *p, const float *const *as_, int m,
                              float *out, parm_idx total)
    void parm_concat_encode(int dtype, const void *const *xs, int k, float *out,
                            parm_idx planes, parm_idx H, parm_idx W)

parm_simd_init()

# Largest k accepted (the pointer table lives on the stack, never allocated).
cdef enum:
    _MAX_K = 64
MAX_K = _MAX_K
# Below this many bytes moved per call the GIL is kept: the work takes well
# under a microsecond, and giving the GIL away would let another thread hold
# it for up to a switch interval (5 ms) before this one could return.
cdef enum:
    _NOGIL_MIN_BYTES = 1 << 16
NOGIL_MIN_BYTES = _NOGIL_MIN_BYTES
# Which float16 loader and which streaming-store loop this CPU got.
SIMD_F16 = parm_simd_f16_name().decode()
SIMD_NT = parm_simd_nt_name().decode()
# float32 sums/decodes whose output is at least this large use streaming stores.
NT_MIN_BYTES = PARM_NT_MIN_BYTES

cdef struct Group:
    int k
    int type_num
    int ndim                    # of one member, (B, *S)
    cnp.npy_intp *dims          # of one member; borrowed from an input array
    Py_ssize_t size             # elements per member
    Py_ssize_t itemsize
    const char *ptrs[_MAX_K]


cdef inline bint _usable(cnp.ndarray a) noexcept:
    # C-contiguous, aligned for its dtype, native byte order.
    return (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_ISNOTSWAPPED(a))


cdef str _unusable_reason(cnp.ndarray a):
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        return "is not C-contiguous (use np.ascontiguousarray)"
    if not cnp.PyArray_ISALIGNED(a):
        return "is not aligned for its dtype (copy it first)"
    return f"has non-native byte order ({a.dtype.str}); convert it first"


cdef str _dtype_names(tuple allowed):
    return " or ".join(cnp.PyArray_DescrFromType(t).name for t in allowed)


cdef int _gather(object inputs, str name, Group *g, int min_k, tuple allowed) except -1:
    """Fills g from a sequence of equal arrays or one stacked (k, B, ...) array."""
    cdef cnp.ndarray a, first
    cdef Py_ssize_t k, i, d, nbytes
    cdef int t
    if cnp.PyArray_Check(inputs):
        a = <cnp.ndarray>inputs
        if cnp.PyArray_NDIM(a) < 2:
            raise ValueError(f"{name}: a stacked array must have shape (k, B, ...), "
                             f"got shape {(<object>a).shape}")
        t = cnp.PyArray_TYPE(a)
        if t not in allowed:
            raise ValueError(f"{name}: dtype must be {_dtype_names(allowed)}, got {a.dtype}")
        if not _usable(a):
            raise ValueError(f"{name} {_unusable_reason(a)}")
        k = cnp.PyArray_DIM(a, 0)
        if k < min_k or k > _MAX_K:
            raise ValueError(f"{name}: need {min_k} <= k <= {_MAX_K} arrays, got k={k}")
        g.k = <int>k
        g.type_num = t
        g.ndim = cnp.PyArray_NDIM(a) - 1
        g.dims = cnp.PyArray_DIMS(a) + 1
        g.itemsize = cnp.PyArray_ITEMSIZE(a)
        g.size = cnp.PyArray_SIZE(a) // k if k else 0
        nbytes = g.size * g.itemsize
        for i in range(k):
            g.ptrs[i] = <const char *>cnp.PyArray_DATA(a) + i * nbytes
        return 0
    if not isinstance(inputs, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of arrays or one stacked "
                         f"ndarray, got {type(inputs).__name__}")
    k = len(inputs)
    if k < min_k or k > _MAX_K:
        raise ValueError(f"{name}: need {min_k} <= k <= {_MAX_K} arrays, got k={k}")
    for i in range(k):
        item = inputs[i]
        if not cnp.PyArray_Check(item):
            raise ValueError(f"{name}[{i}] is not a numpy.ndarray "
                             f"(got {type(item).__name__})")
        a = <cnp.ndarray>item
        if i == 0:
            first = a
            t = cnp.PyArray_TYPE(a)
            if t not in allowed:
                raise ValueError(f"{name}[0]: dtype must be {_dtype_names(allowed)}, "
                                 f"got {a.dtype}")
            if cnp.PyArray_NDIM(a) < 1:
                raise ValueError(f"{name}[0] must have shape (B, ...), got a 0-d array")
            g.type_num = t
            g.ndim = cnp.PyArray_NDIM(a)
            g.dims = cnp.PyArray_DIMS(a)
            g.itemsize = cnp.PyArray_ITEMSIZE(a)
            g.size = cnp.PyArray_SIZE(a)
        else:
            if cnp.PyArray_TYPE(a) != g.type_num:
                raise ValueError(f"{name}[{i}] has dtype {a.dtype}, {name}[0] has "
                                 f"{first.dtype}; all must match")
            if cnp.PyArray_NDIM(a) != g.ndim:
                raise ValueError(f"{name}[{i}] has shape {(<object>a).shape}, {name}[0] has "
                                 f"{(<object>first).shape}; all must match")
            for d in range(g.ndim):
                if cnp.PyArray_DIM(a, d) != g.dims[d]:
                    raise ValueError(f"{name}[{i}] has shape {(<object>a).shape}, {name}[0] has "
                                     f"{(<object>first).shape}; all must match")
        if not _usable(a):
            raise ValueError(f"{name}[{i}] {_unusable_reason(a)}")
        g.ptrs[i] = <const char *>cnp.PyArray_DATA(a)
    g.k = <int>k
    return 0


cdef str _shape_str(int ndim, cnp.npy_intp *dims):
    return str(tuple(dims[d] for d in range(ndim)))


cdef cnp.ndarray _output(object out, int ndim, cnp.npy_intp *dims, str what):
    """Returns `out` checked to be float32 (dims), writable, usable; or a new one."""
    cdef cnp.ndarray o
    cdef int d
    if out is None:
        return cnp.PyArray_EMPTY(ndim, dims, cnp.NPY_FLOAT32, 0)
    if not cnp.PyArray_Check(out):
        raise ValueError(f"out must be a numpy.ndarray or None, got {type(out).__name__}")
    o = <cnp.ndarray>out
    if cnp.PyArray_TYPE(o) != cnp.NPY_FLOAT32:
        raise ValueError(f"out must have dtype float32, got {o.dtype}")
    if cnp.PyArray_NDIM(o) != ndim:
        raise ValueError(f"out must have shape {_shape_str(ndim, dims)} ({what}), "
                         f"got {(<object>o).shape}")
    for d in range(ndim):
        if cnp.PyArray_DIM(o, d) != dims[d]:
            raise ValueError(f"out must have shape {_shape_str(ndim, dims)} ({what}), "
                             f"got {(<object>o).shape}")
    if not cnp.PyArray_ISWRITEABLE(o):
        raise ValueError("out is read-only; pass a writable array")
    if not _usable(o):
        raise ValueError(f"out {_unusable_reason(o)}")
    return o


cdef int _check_overlap(const char *o, Py_ssize_t o_bytes, const char *x,
                        Py_ssize_t x_bytes, str name) except -1:
    # `out` may be exactly a float32 input (same start and size; the shapes
    # are equal) but not overlap one otherwise: a shifted alias, or a narrower
    # dtype under a float32 out, would read values already overwritten.
    if (o != x or o_bytes != x_bytes) and o < x + x_bytes and x < o + o_bytes:
        raise ValueError(f"out partially overlaps {name}; pass a separate array "
                         "or exactly the same one")
    return 0


cdef inline int _code(int type_num) noexcept:
    if type_num == cnp.NPY_FLOAT32:
        return PARM_F32
    if type_num == cnp.NPY_FLOAT16:
        return PARM_F16
    return PARM_U8


_IN_TYPES = (cnp.NPY_FLOAT32, cnp.NPY_FLOAT16, cnp.NPY_UINT8)
_F32 = (cnp.NPY_FLOAT32,)


cdef const float *_channel_vector(object v, str name, Py_ssize_t channels) except? NULL:
    cdef cnp.ndarray a
    if v is None:
        return NULL
    if not cnp.PyArray_Check(v):
        raise ValueError(f"{name} must be a float32 ndarray of shape ({channels},), "
                         f"got {type(v).__name__}")
    a = <cnp.ndarray>v
    if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32:
        raise ValueError(f"{name} must have dtype float32, got {a.dtype}")
    if cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIM(a, 0) != channels:
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel, "
                         f"axis 1 of a batch), got {(<object>a).shape}")
    if not _usable(a):
        raise ValueError(f"{name} {_unusable_reason(a)}")
    return <const float *>cnp.PyArray_DATA(a)


# ----------------------------------------------------------------- layer 1

cdef void _sum_kernel(int dtype, const void *const *xs, int k, float *out,
                      Py_ssize_t nblocks, Py_ssize_t inner, Py_ssize_t channels,
                      const float *scale, const float *shift) noexcept nogil:
    parm_sum_encode(dtype, xs, k, out, nblocks, inner, channels, scale, shift)


cdef void _decode_kernel(const float *p, const float *const *as_, int m, float *out,
                         Py_ssize_t total) noexcept nogil:
    parm_subtract_decode(p, as_, m, out, total)


cdef void _concat_kernel(int dtype, const void *const *xs, int k, float *out,
                         Py_ssize_t planes, Py_ssize_t H, Py_ssize_t W) noexcept nogil:
    parm_concat_encode(dtype, xs, k, out, planes, H, W)


# ----------------------------------------------------------------- layer 2

def sum_encode(inputs, out=None, *, scale=None, shift=None):
    """Summation encoder: the parity batch of k query batches.

    Args:
        inputs: k >= 2 ndarrays of one shape (B, *S) and one dtype (float32,
            float16 or uint8), each C-contiguous (read-only is fine); or one
            ndarray of shape (k, B, *S).
        out: float32 C-contiguous writable ndarray of shape (B, *S), or None
            to allocate one. It may be exactly one of the float32 inputs.
        scale: optional float32 ndarray of shape (C,), C = S[0] if
            len(S) >= 2 else 1 (the channel axis is axis 1 of the batch).
        shift: optional float32 ndarray of shape (C,).

    Returns:
        `out`: ((x0 + x1) + ...) in float32, left to right; with scale/shift,
        scale[c] * sum + (k * shift[c]) per channel c (missing scale = 1,
        missing shift = 0), which equals normalising each query, then summing.

    Raises:
        ValueError: naming the offending argument.
    """
    cdef Group g
    cdef cnp.ndarray o
    cdef Py_ssize_t channels, nblocks, inner, i, o_bytes
    cdef const float *sc
    cdef const float *sh
    cdef float *op
    cdef int code
    _gather(inputs, "inputs", &g, 2, _IN_TYPES)
    o = _output(out, g.ndim, g.dims, "the shape of one input")
    op = <float *>cnp.PyArray_DATA(o)
    o_bytes = g.size * 4
    for i in range(g.k):
        _check_overlap(<const char *>op, o_bytes, g.ptrs[i], g.size * g.itemsize, "an input")
    if scale is None and shift is None:
        nblocks, inner, channels = 1, g.size, 1
        sc = sh = NULL
    else:
        channels = g.dims[1] if g.ndim >= 3 else 1
        nblocks = g.dims[0] * channels
        inner = g.size // nblocks if nblocks else 0
        sc = _channel_vector(scale, "scale", channels)
        sh = _channel_vector(shift, "shift", channels)
    code = _code(g.type_num)
    if g.size * (g.itemsize * g.k + 4) >= _NOGIL_MIN_BYTES:
        with nogil:
            _sum_kernel(code, <const void *const *>g.ptrs, g.k, op, nblocks, inner,
                        channels, sc, sh)
    else:
        _sum_kernel(code, <const void *const *>g.ptrs, g.k, op, nblocks, inner,
                    channels, sc, sh)
    return o


def subtract_decode(parity_output, available, out=None):
    """Subtraction decoder: reconstructs the one missing output of a group.

    Args:
        parity_output: float32 C-contiguous ndarray of shape (B, *O), the
            parity model's output for the group.
        available: k-1 >= 1 float32 ndarrays of shape (B, *O) (the outputs
            that arrived), or one ndarray of shape (k-1, B, *O).
        out: float32 C-contiguous writable ndarray of shape (B, *O), or None
            to allocate one. It may be exactly parity_output or an input.

    Returns:
        `out` = parity_output - ((a0 + a1) + ...), float32.

    Raises:
        ValueError: naming the offending argument.
    """
    cdef Group g
    cdef cnp.ndarray p, o
    cdef Py_ssize_t i, d, nbytes
    cdef const float *pp
    cdef float *op
    if not cnp.PyArray_Check(parity_output):
        raise ValueError("parity_output must be a float32 numpy.ndarray, got "
                         f"{type(parity_output).__name__}")
    p = <cnp.ndarray>parity_output
    if cnp.PyArray_TYPE(p) != cnp.NPY_FLOAT32:
        raise ValueError(f"parity_output must have dtype float32, got {p.dtype}")
    if cnp.PyArray_NDIM(p) < 1:
        raise ValueError("parity_output must have shape (B, ...), got a 0-d array")
    if not _usable(p):
        raise ValueError(f"parity_output {_unusable_reason(p)}")
    _gather(available, "available", &g, 1, _F32)
    if g.ndim != cnp.PyArray_NDIM(p):
        raise ValueError(f"available outputs have shape {_shape_str(g.ndim, g.dims)}, "
                         f"parity_output has {(<object>p).shape}; they must match")
    for d in range(g.ndim):
        if g.dims[d] != cnp.PyArray_DIM(p, d):
            raise ValueError(f"available outputs have shape {_shape_str(g.ndim, g.dims)}, "
                             f"parity_output has {(<object>p).shape}; they must match")
    o = _output(out, g.ndim, g.dims, "the shape of parity_output")
    op = <float *>cnp.PyArray_DATA(o)
    pp = <const float *>cnp.PyArray_DATA(p)
    nbytes = g.size * 4
    _check_overlap(<const char *>op, nbytes, <const char *>pp, nbytes, "parity_output")
    for i in range(g.k):
        _check_overlap(<const char *>op, nbytes, g.ptrs[i], nbytes, "an available output")
    if g.size * 4 * (g.k + 2) >= _NOGIL_MIN_BYTES:
        with nogil:
            _decode_kernel(pp, <const float *const *>g.ptrs, g.k, op, g.size)
    else:
        _decode_kernel(pp, <const float *const *>g.ptrs, g.k, op, g.size)
    return o


def concat_encode(inputs, out=None):
    """Concatenation encoder for images: downsample k queries and tile them.

    Args:
        inputs: k in {2, 4} ndarrays of shape (B, C, H, W) and one dtype
            (float32, float16 or uint8), C-contiguous; or one ndarray of shape
            (k, B, C, H, W). k = 2 needs W even; k = 4 needs H and W even.
        out: float32 C-contiguous writable ndarray of shape (B, C, H, W), or
            None to allocate one. It must not overlap the inputs.

    Returns:
        `out`. k = 2: each query is averaged over 1x2 windows along the width,
        d_i[..., h, j] = (x_i[..., h, 2j] + x_i[..., h, 2j+1]) * 0.5, and
        d_0 | d_1 are placed side by side. k = 4: 2x2 windows,
        ((x[2h, 2j] + x[2h, 2j+1]) + (x[2h+1, 2j] + x[2h+1, 2j+1])) * 0.25,
        tiled d_0 d_1 / d_2 d_3. Channel c of the parity only combines
        channel c of each query.

    Raises:
        ValueError: naming the offending argument.
    """
    cdef Group g
    cdef cnp.ndarray o
    cdef Py_ssize_t i, H, W
    cdef float *op
    cdef int code
    _gather(inputs, "inputs", &g, 2, _IN_TYPES)
    if g.k != 2 and g.k != 4:
        raise ValueError(f"concat_encode supports k = 2 or 4, got k={g.k}")
    if g.ndim != 4:
        raise ValueError("concat_encode inputs must have shape (B, C, H, W), got "
                         f"{_shape_str(g.ndim, g.dims)}")
    H = g.dims[2]
    W = g.dims[3]
    if W % 2:
        raise ValueError(f"concat_encode needs an even width W, got W={W}")
    if g.k == 4 and H % 2:
        raise ValueError(f"concat_encode with k=4 needs an even height H, got H={H}")
    o = _output(out, g.ndim, g.dims, "the shape of one input")
    op = <float *>cnp.PyArray_DATA(o)
    for i in range(g.k):
        # Unlike the sums, no aliasing at all: tile i is written where other
        # inputs' pixels are still to be read.
        if (<const char *>op < g.ptrs[i] + g.size * g.itemsize
                and g.ptrs[i] < <const char *>op + g.size * 4):
            raise ValueError("out overlaps an input; concat_encode needs a separate "
                             "out array")
    code = _code(g.type_num)
    if g.size * (g.itemsize * g.k + 4) >= _NOGIL_MIN_BYTES:
        with nogil:
            _concat_kernel(code, <const void *const *>g.ptrs, g.k, op,
                           g.dims[0] * g.dims[1], H, W)
    else:
        _concat_kernel(code, <const void *const *>g.ptrs, g.k, op, g.dims[0] * g.dims[1],
                       H, W)
    return o
