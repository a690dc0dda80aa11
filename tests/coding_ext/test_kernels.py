"""The Cython kernels against the numpy reference, in both builds.

Tolerance table (kernel vs coding_ext.reference), per op and input dtype:

    op               float32   float16   uint8
    sum_encode       exact     exact     exact
    sum_encode+affine exact    exact     exact
    concat_encode    exact     exact     exact
    subtract_decode  exact     -         -

Exact because both sides do the same float32 operations in the same order,
float16 and uint8 convert to float32 exactly, and the kernels are compiled
with -ffp-contract=off (no fused multiply-add). A mismatch of even one ulp
therefore means the kernel does not compute the defined function.
"""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import coding_ext
import coding_ext.debug
from coding_ext import reference

BUILDS = [coding_ext, coding_ext.debug]
IDS = ["release", "debug"]
DTYPES = [np.float32, np.float16, np.uint8]
SETTINGS = settings(max_examples=40, deadline=None)

pytestmark = pytest.mark.parametrize("ce", BUILDS, ids=IDS)


def _random(rng, shape, dtype):
    if np.dtype(dtype) == np.uint8:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return (rng.standard_normal(shape) * 10).astype(dtype)


def _batch(rng, k, shape, dtype):
    return [_random(rng, shape, dtype) for _ in range(k)]


shapes = st.tuples(
    st.integers(0, 3),  # B
    st.lists(st.integers(1, 9), min_size=0, max_size=3),  # S
).map(lambda t: (t[0], *t[1]))


def test_build_names(ce):
    assert ce.BUILD == ("debug" if ce is coding_ext.debug else "release")


# ------------------------------------------------------------------ sum_encode


@SETTINGS
@given(
    k=st.integers(2, 4),
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    stacked=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_matches_reference(ce, k, shape, dtype, stacked, seed):
    rng = np.random.default_rng(seed)
    xs = _batch(rng, k, shape, dtype)
    got = ce.sum_encode(np.stack(xs) if stacked else xs)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, reference.sum_encode(xs))


@SETTINGS
@given(
    k=st.integers(2, 4),
    b=st.integers(0, 3),
    s=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    which=st.sampled_from(["both", "scale", "shift"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_affine_matches_reference(ce, k, b, s, dtype, which, seed):
    rng = np.random.default_rng(seed)
    shape = (b, *s)
    channels = s[0] if len(s) >= 2 else 1
    xs = _batch(rng, k, shape, dtype)
    kw = {}
    if which in ("both", "scale"):
        kw["scale"] = rng.standard_normal(channels).astype(np.float32)
    if which in ("both", "shift"):
        kw["shift"] = rng.standard_normal(channels).astype(np.float32)
    np.testing.assert_array_equal(ce.sum_encode(xs, **kw), reference.sum_encode(xs, **kw))


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 4095, 4096, 4097, 10001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_sizes_and_k(ce, k, n, dtype):
    """Vector tails and PARM_CHUNK (4096) boundaries, specialised and general k."""
    rng = np.random.default_rng(n * 10 + k)
    xs = _batch(rng, k, (2, n), dtype)
    np.testing.assert_array_equal(ce.sum_encode(xs), reference.sum_encode(xs))
    shift = np.array([0.25], np.float32)
    np.testing.assert_array_equal(
        ce.sum_encode(xs, shift=shift), reference.sum_encode(xs, shift=shift)
    )


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_sum_streaming_store_path(ce, k, offset):
    """Outputs >= NT_MIN_BYTES take the streaming-store loop: misaligned starts, tails."""
    n = (coding_ext._kernels.NT_MIN_BYTES // 4) + 37
    rng = np.random.default_rng(k * 10 + offset)
    xs = [rng.standard_normal(n + offset).astype(np.float32)[offset:].reshape(1, n)
          for _ in range(k)]
    out = np.empty(n + offset, np.float32)[offset:].reshape(1, n)
    expected = reference.sum_encode(xs)
    assert ce.sum_encode(xs, out) is out
    np.testing.assert_array_equal(out, expected)
    assert ce.sum_encode(xs, xs[1]) is xs[1]  # exact alias on this path too
    np.testing.assert_array_equal(xs[1], expected)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_decode_streaming_store_path(ce, m):
    n = (coding_ext._kernels.NT_MIN_BYTES // 4) + 5
    rng = np.random.default_rng(m)
    p = rng.standard_normal((1, n)).astype(np.float32)
    avail = [rng.standard_normal((1, n)).astype(np.float32) for _ in range(m)]
    np.testing.assert_array_equal(
        ce.subtract_decode(p, avail), reference.subtract_decode(p, avail)
    )


def test_float16_every_bit_pattern(ce):
    """All 65536 halves (subnormals, infinities, NaNs) convert exactly, on the
    vector path (one long call) and on the scalar path (15-element calls)."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(1, -1)
    zeros = np.zeros_like(halves)
    with np.errstate(invalid="ignore"):
        expected = reference.sum_encode([halves, zeros])
    np.testing.assert_array_equal(ce.sum_encode([halves, zeros]), expected)
    out = np.empty((1, 15), np.float32)
    for start in range(0, 1 << 16, 15):
        part = halves[:, start : start + 15]
        got = ce.sum_encode([part, zeros[:, : part.shape[1]]], out[:, : part.shape[1]])
        np.testing.assert_array_equal(got, expected[:, start : start + 15])


def test_sum_affine_equals_normalise_then_sum(ce):
    rng = np.random.default_rng(1)
    xs = _batch(rng, 3, (4, 3, 8, 8), np.uint8)
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    scale, shift = (1 / std).astype(np.float32), (-mean / std).astype(np.float32)
    got = ce.sum_encode(xs, scale=scale, shift=shift)
    normalised = [(x.astype(np.float64) - mean[:, None, None]) / std[:, None, None] for x in xs]
    np.testing.assert_allclose(got, sum(normalised), rtol=1e-5, atol=1e-5)


def test_sum_hand_example(ce):
    xs = [np.array([[1.0, 2.0]], np.float32), np.array([[10.0, 20.0]], np.float32),
          np.array([[100.0, 200.0]], np.float32)]
    np.testing.assert_array_equal(ce.sum_encode(xs), [[111.0, 222.0]])
    np.testing.assert_array_equal(
        ce.sum_encode(xs, scale=np.array([2.0], np.float32), shift=np.array([1.0], np.float32)),
        [[225.0, 447.0]],
    )


def test_sum_out_written_in_place(ce):
    rng = np.random.default_rng(2)
    xs = _batch(rng, 3, (2, 3, 5), np.float32)
    out = np.full((2, 3, 5), np.nan, np.float32)
    got = ce.sum_encode(xs, out)
    assert got is out
    np.testing.assert_array_equal(out, reference.sum_encode(xs))


def test_sum_out_may_be_an_input(ce):
    rng = np.random.default_rng(3)
    xs = _batch(rng, 3, (2, 100), np.float32)
    expected = reference.sum_encode(xs)
    assert ce.sum_encode(xs, out=xs[1]) is xs[1]
    np.testing.assert_array_equal(xs[1], expected)


def test_sum_read_only_inputs(ce):
    """Arrays over bytes (as from protobuf) are read-only and must work."""
    rng = np.random.default_rng(4)
    xs = _batch(rng, 2, (3, 7), np.float32)
    ro = [np.frombuffer(x.tobytes(), np.float32).reshape(3, 7) for x in xs]
    assert not ro[0].flags.writeable
    np.testing.assert_array_equal(ce.sum_encode(ro), reference.sum_encode(xs))
    stacked = np.stack(xs)
    stacked.flags.writeable = False
    np.testing.assert_array_equal(ce.sum_encode(stacked), reference.sum_encode(xs))


def test_sum_from_threads(ce):
    """The kernels keep no state: concurrent calls all get right answers."""
    rng = np.random.default_rng(5)
    xs = _batch(rng, 4, (2, 3, 64, 64), np.float32)
    expected = reference.sum_encode(xs)
    errors = []

    def work():
        out = np.empty_like(expected)
        for _ in range(30):
            ce.sum_encode(xs, out)
            if not np.array_equal(out, expected):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _x(shape=(2, 3), dtype=np.float32):
    return np.ones(shape, dtype)


@pytest.mark.parametrize(
    "inputs, kwargs, match",
    [
        (lambda: [_x()], {}, "k=1"),
        (lambda: [_x()] * 65, {}, "k=65"),
        (lambda: np.ones((1, 2, 3), np.float32), {}, "k=1"),
        (lambda: 5, {}, "list or tuple"),
        (lambda: {"a": _x()}, {}, "list or tuple"),
        (lambda: [_x(), [[1.0, 1.0, 1.0]] * 2], {}, r"inputs\[1\] is not a numpy"),
        (lambda: [_x(), _x((2, 4))], {}, "shape"),
        (lambda: [_x(), _x((2, 3, 1))], {}, "shape"),
        (lambda: [_x(), _x(dtype=np.float16)], {}, "dtype"),
        (lambda: [_x(dtype=np.float64)] * 2, {}, "dtype"),
        (lambda: [_x(dtype=np.int32)] * 2, {}, "dtype"),
        (lambda: [_x(), np.ones((2, 6), np.float32)[:, ::2]], {}, "C-contiguous"),
        (lambda: [_x(), _x().astype(">f4")], {}, "byte order"),
        (lambda: [np.float32(1.0), np.float32(2.0)], {}, "not a numpy"),
        (lambda: [np.ones((), np.float32)] * 2, {}, "0-d"),
        (lambda: np.ones(4, np.float32), {}, r"shape \(k, B"),
        (lambda: [_x()] * 2, {"out": np.empty((2, 4), np.float32)}, "out must have shape"),
        (lambda: [_x()] * 2, {"out": np.empty((2, 3), np.float64)}, "float32"),
        (lambda: [_x()] * 2, {"out": np.empty((3, 2), np.float32).T}, "C-contiguous"),
        (lambda: [_x()] * 2, {"out": [[0.0] * 3] * 2}, "out must be a numpy"),
        (lambda: [_x((2, 3, 4))] * 2, {"scale": np.ones(4, np.float32)}, r"shape \(3,\)"),
        (lambda: [_x((2, 3, 4))] * 2, {"shift": np.ones(3, np.float64)}, "float32"),
        (lambda: [_x((2, 3, 4))] * 2, {"shift": [0.0, 0.0, 0.0]}, "float32 ndarray"),
        (lambda: [_x((2, 3))] * 2, {"scale": np.ones(3, np.float32)}, r"shape \(1,\)"),
    ],
)
def test_sum_rejects_bad_input(ce, inputs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ce.sum_encode(inputs(), **kwargs)


def _call(ce, op, out):
    if op == "sum":
        return ce.sum_encode([_x((1, 2, 4, 4))] * 2, out)
    if op == "concat":
        return ce.concat_encode([_x((1, 2, 4, 4))] * 4, out)
    return ce.subtract_decode(_x((1, 2, 4, 4)), [_x((1, 2, 4, 4))] * 2, out)


@pytest.mark.parametrize("op", ["sum", "concat", "decode"])
def test_rejects_read_only_out(ce, op):
    out = np.empty((1, 2, 4, 4), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _call(ce, op, out)


@pytest.mark.parametrize("op", ["sum", "concat", "decode"])
@pytest.mark.parametrize(
    "out, match",
    [
        (lambda: np.empty((1, 2, 4, 8), np.float32)[..., ::2], "C-contiguous"),
        (lambda: np.empty((1, 2, 4, 4), np.float64), "float32"),
        (lambda: np.empty((1, 2, 4, 4), ">f4"), "byte order"),
        (lambda: np.empty((2, 2, 4, 4), np.float32), "out must have shape"),
        (lambda: np.empty((1, 2, 16), np.float32), "out must have shape"),
    ],
)
def test_rejects_bad_out(ce, op, out, match):
    with pytest.raises(ValueError, match=match):
        _call(ce, op, out())


def test_sum_rejects_partial_overlap(ce):
    buf = np.zeros(20, np.float32)
    a, b = buf[0:10].reshape(2, 5), np.ones((2, 5), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        ce.sum_encode([a, b], out=buf[2:12].reshape(2, 5))
    assert not buf.any()


@pytest.mark.parametrize("dtype", [np.float16, np.uint8])
def test_sum_rejects_out_over_narrower_input(ce, dtype):
    """A float32 out starting where a float16/uint8 input starts is not "the same array"."""
    buf = np.zeros(8192, np.float32)
    x0 = buf.view(dtype)[:8192].reshape(1, 8192)
    with pytest.raises(ValueError, match="overlap"):
        ce.sum_encode([x0, np.ones((1, 8192), dtype)], out=buf.reshape(1, 8192))


# --------------------------------------------------------------- concat_encode


@SETTINGS
@given(
    k=st.sampled_from([2, 4]),
    b=st.integers(0, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 20),
    dtype=st.sampled_from(DTYPES),
    stacked=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_concat_matches_reference(ce, k, b, c, h, w, dtype, stacked, seed):
    rng = np.random.default_rng(seed)
    shape = (b, c, 2 * h if k == 4 else h, 2 * w)
    xs = _batch(rng, k, shape, dtype)
    got = ce.concat_encode(np.stack(xs) if stacked else xs)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, reference.concat_encode(xs))


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_wide_rows(ce, k, dtype):
    """Rows wider than the float16 scratch chunk (4096) and odd vector tails."""
    rng = np.random.default_rng(k)
    xs = _batch(rng, k, (1, 2, 4, 2 * 4101), dtype)
    np.testing.assert_array_equal(ce.concat_encode(xs), reference.concat_encode(xs))


def test_concat_hand_example_k2(ce):
    x0 = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    x1 = 100 + x0
    np.testing.assert_array_equal(
        ce.concat_encode([x0, x1]),
        [[[[0.5, 2.5, 100.5, 102.5], [4.5, 6.5, 104.5, 106.5]]]],
    )


def test_concat_hand_example_k4(ce):
    """Tiles: d0 top-left, d1 top-right, d2 bottom-left, d3 bottom-right; channels kept apart."""
    base = np.arange(16, dtype=np.float32).reshape(4, 4)
    xs = [np.stack([base + 1000 * i, base + 1000 * i + 50])[None] for i in range(4)]
    pooled = np.array([[2.5, 4.5], [10.5, 12.5]], np.float32)
    got = ce.concat_encode(xs)
    for c, extra in enumerate([0, 50]):
        np.testing.assert_array_equal(got[0, c, :2, :2], pooled + extra)
        np.testing.assert_array_equal(got[0, c, :2, 2:], pooled + 1000 + extra)
        np.testing.assert_array_equal(got[0, c, 2:, :2], pooled + 2000 + extra)
        np.testing.assert_array_equal(got[0, c, 2:, 2:], pooled + 3000 + extra)


def test_concat_out_written_in_place(ce):
    rng = np.random.default_rng(6)
    xs = _batch(rng, 4, (2, 3, 6, 8), np.float16)
    out = np.full((2, 3, 6, 8), np.nan, np.float32)
    assert ce.concat_encode(xs, out) is out
    np.testing.assert_array_equal(out, reference.concat_encode(xs))


def test_concat_odd_height_ok_for_k2(ce):
    rng = np.random.default_rng(7)
    xs = _batch(rng, 2, (1, 1, 3, 4), np.float32)
    np.testing.assert_array_equal(ce.concat_encode(xs), reference.concat_encode(xs))


def _img(shape=(1, 3, 4, 4), dtype=np.float32):
    return np.ones(shape, dtype)


@pytest.mark.parametrize(
    "inputs, out, match",
    [
        (lambda: [_img()] * 3, None, "k = 2 or 4"),
        (lambda: [_img()], None, "k=1"),
        (lambda: [_img((1, 3, 4, 5))] * 2, None, "even width"),
        (lambda: [_img((1, 3, 5, 4))] * 4, None, "even height"),
        (lambda: [_img((3, 4, 4))] * 2, None, r"\(B, C, H, W\)"),
        (lambda: [_img(), _img((1, 3, 4, 6))], None, "shape"),
        (lambda: [_img(dtype=np.float64)] * 2, None, "dtype"),
        (lambda: [_img()] * 2, np.empty((1, 3, 4, 2), np.float32), "out must have shape"),
        (lambda: [_img()] * 2, np.empty((1, 3, 4, 4), np.float16), "float32"),
    ],
)
def test_concat_rejects_bad_input(ce, inputs, out, match):
    with pytest.raises(ValueError, match=match):
        ce.concat_encode(inputs(), out)


def test_concat_rejects_out_aliasing_input(ce):
    xs = [_img(), _img()]
    with pytest.raises(ValueError, match="overlaps"):
        ce.concat_encode(xs, xs[1])


# ------------------------------------------------------------- subtract_decode


@SETTINGS
@given(
    m=st.integers(1, 3),
    shape=shapes,
    stacked=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_matches_reference(ce, m, shape, stacked, seed):
    rng = np.random.default_rng(seed)
    p = _random(rng, shape, np.float32)
    avail = _batch(rng, m, shape, np.float32)
    got = ce.subtract_decode(p, np.stack(avail) if stacked else avail)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, reference.subtract_decode(p, avail))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 17, 4097, 10001])
def test_decode_sizes_and_k(ce, m, n):
    rng = np.random.default_rng(m * n)
    p = _random(rng, (1, n), np.float32)
    avail = _batch(rng, m, (1, n), np.float32)
    np.testing.assert_array_equal(
        ce.subtract_decode(p, avail), reference.subtract_decode(p, avail)
    )


def test_decode_reconstructs_missing_output(ce):
    """parity = sum of outputs exactly (small integers) -> exact reconstruction."""
    rng = np.random.default_rng(8)
    outs = [rng.integers(-50, 50, (4, 10)).astype(np.float32) for _ in range(3)]
    parity = reference.sum_encode(outs)
    for missing in range(3):
        avail = [o for i, o in enumerate(outs) if i != missing]
        np.testing.assert_array_equal(ce.subtract_decode(parity, avail), outs[missing])


def test_decode_out_in_place_and_aliasing_parity(ce):
    rng = np.random.default_rng(9)
    p = _random(rng, (2, 10), np.float32)
    avail = _batch(rng, 2, (2, 10), np.float32)
    expected = reference.subtract_decode(p, avail)
    out = np.full((2, 10), np.nan, np.float32)
    assert ce.subtract_decode(p, avail, out) is out
    np.testing.assert_array_equal(out, expected)
    assert ce.subtract_decode(p, avail, p) is p
    np.testing.assert_array_equal(p, expected)


@pytest.mark.parametrize(
    "parity, available, out, match",
    [
        (lambda: _x(dtype=np.float16), lambda: [_x()], None, "parity_output must have dtype"),
        (lambda: [[1.0]], lambda: [_x()], None, "parity_output must be"),
        (lambda: np.ones((), np.float32), lambda: [_x()], None, "0-d"),
        (lambda: np.ones((2, 6), np.float32)[:, ::2], lambda: [_x()], None, "C-contiguous"),
        (lambda: _x(), lambda: [], None, "k=0"),
        (lambda: _x(), lambda: [_x((2, 4))], None, "must match"),
        (lambda: _x(), lambda: [_x(), _x((2, 4))], None, "shape"),
        (lambda: _x(), lambda: [_x(dtype=np.float16)], None, "dtype"),
        (lambda: _x(), lambda: _x(), None, "must match"),
        (lambda: _x(), lambda: [_x()], np.empty((2, 3), np.float64), "float32"),
        (lambda: _x(), lambda: [_x()], np.empty((3, 2), np.float32), "out must have shape"),
    ],
)
def test_decode_rejects_bad_input(ce, parity, available, out, match):
    with pytest.raises(ValueError, match=match):
        ce.subtract_decode(parity(), available(), out)


# ------------------------------------------------------------------------- GIL


def _main_thread_ran_during(fn, calls):
    """True if the main thread ran while a worker made `calls` calls of fn.

    With a 10 s switch interval the worker keeps the GIL until it blocks or
    exits, unless the kernel gives it away: so the main thread sees the
    worker unfinished exactly when the kernel released the GIL.
    """
    import sys

    state = {"done": False, "stop": False}

    def worker():
        for _ in range(calls):
            if state["stop"]:
                break
            fn()
        state["done"] = True

    old = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        ran = not state["done"]
        state["stop"] = True
        t.join()
    finally:
        sys.setswitchinterval(old)
    return ran


@pytest.mark.parametrize("op", ["sum", "decode", "concat"])
def test_large_calls_release_the_gil(ce, op):
    rng = np.random.default_rng(10)
    xs = _batch(rng, 2, (4, 3, 128, 128), np.float32)
    out = np.empty_like(xs[0])
    call = {
        "sum": lambda: ce.sum_encode(xs, out),
        "decode": lambda: ce.subtract_decode(xs[0], xs[1:], out),
        "concat": lambda: ce.concat_encode(xs, out),
    }[op]
    assert _main_thread_ran_during(call, calls=5000)


def test_small_calls_keep_the_gil(ce):
    """Below NOGIL_MIN_BYTES the kernel does not hand the GIL away."""
    rng = np.random.default_rng(11)
    xs = _batch(rng, 2, (1, 784), np.float32)
    out = np.empty_like(xs[0])
    assert (2 + 1) * xs[0].nbytes < ce.NOGIL_MIN_BYTES
    assert not _main_thread_ran_during(lambda: ce.sum_encode(xs, out), calls=400)
