"""The numpy reference against independent float64 arithmetic and hand examples.

Tolerance table (float32 reference vs the exact float64 value), per op:

    op               bound on |reference - exact|
    sum_encode       (k - 1) * eps32 * sum_i |x_i|          (k-1 roundings)
    sum + affine     above * |scale| + 2 * eps32 * |result| + k * eps32 * |shift|
    concat_encode    4 * eps32 * mean |x| over the window   (pairwise adds, exact * 0.5/0.25)
    subtract_decode  k * eps32 * (|p| + sum_i |a_i|)

eps32 = 2**-23 (float32 unit roundoff is eps32 / 2; the bounds are loose by 2).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coding_ext import reference

EPS32 = np.float64(2.0**-23)
SETTINGS = settings(max_examples=40, deadline=None)


def _xs(seed, k, shape, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 100).astype(dtype) for _ in range(k)]


@SETTINGS
@given(k=st.integers(2, 6), n=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_sum_within_rounding_of_exact(k, n, seed):
    xs = _xs(seed, k, (2, n))
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    bound = (k - 1) * EPS32 * np.sum([np.abs(x.astype(np.float64)) for x in xs], axis=0)
    got = reference.sum_encode(xs)
    assert got.dtype == np.float32
    assert (np.abs(got - exact) <= bound).all()


@SETTINGS
@given(k=st.integers(2, 4), seed=st.integers(0, 2**32 - 1))
def test_sum_affine_within_rounding_of_exact(k, seed):
    xs = _xs(seed, k, (3, 4, 5, 6))
    rng = np.random.default_rng(seed + 1)
    scale = rng.standard_normal(4).astype(np.float32)
    shift = rng.standard_normal(4).astype(np.float32)
    x64 = [x.astype(np.float64) for x in xs]
    s, a = scale.astype(np.float64)[:, None, None], shift.astype(np.float64)[:, None, None]
    exact = sum(x * s + a for x in x64)
    abs_sum = sum(np.abs(x) for x in x64)
    bound = ((k - 1) * EPS32 * abs_sum * np.abs(s) + 2 * EPS32 * np.abs(exact)
             + k * EPS32 * np.abs(a) + 1e-30)
    got = reference.sum_encode(xs, scale=scale, shift=shift)
    assert (np.abs(got - exact) <= bound).all()


def test_sum_accepts_stacked_and_mixed_dtypes_convert_exactly():
    xs = _xs(0, 3, (2, 5), np.float16)
    np.testing.assert_array_equal(reference.sum_encode(np.stack(xs)), reference.sum_encode(xs))
    u8 = [np.array([[255, 0, 7]], np.uint8)] * 4
    np.testing.assert_array_equal(reference.sum_encode(u8), [[1020.0, 0.0, 28.0]])


@pytest.mark.parametrize("k", [2, 4])
def test_concat_within_rounding_of_exact(k):
    xs = _xs(k, k, (2, 3, 8, 10))
    x64 = [x.astype(np.float64) for x in xs]
    if k == 2:
        ds = [(x[..., 0::2] + x[..., 1::2]) / 2 for x in x64]
        mags = [(np.abs(x[..., 0::2]) + np.abs(x[..., 1::2])) / 2 for x in x64]
        exact, mag = np.concatenate(ds, -1), np.concatenate(mags, -1)
    else:
        def pool(x):
            return (x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2]
                    + x[..., 1::2, 1::2]) / 4
        ds = [pool(x) for x in x64]
        ms = [pool(np.abs(x)) for x in x64]
        exact = np.concatenate([np.concatenate(ds[:2], -1), np.concatenate(ds[2:], -1)], -2)
        mag = np.concatenate([np.concatenate(ms[:2], -1), np.concatenate(ms[2:], -1)], -2)
    got = reference.concat_encode(xs)
    assert got.shape == xs[0].shape and got.dtype == np.float32
    assert (np.abs(got - exact) <= 4 * EPS32 * mag).all()


def test_concat_rejects_other_k():
    with pytest.raises(ValueError, match="k = 2 or 4"):
        reference.concat_encode(_xs(0, 3, (1, 1, 2, 2)))


@SETTINGS
@given(m=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_decode_within_rounding_of_exact(m, seed):
    p, *avail = _xs(seed, m + 1, (3, 7))
    exact = p.astype(np.float64) - np.sum([a.astype(np.float64) for a in avail], axis=0)
    mag = np.abs(p.astype(np.float64)) + np.sum([np.abs(a.astype(np.float64)) for a in avail], 0)
    got = reference.subtract_decode(p, avail)
    assert (np.abs(got - exact) <= (m + 1) * EPS32 * mag).all()


def test_decode_order_is_parity_minus_sum():
    """p - (a0 + a1), not (p - a0) - a1: the two differ in float32 here."""
    p = np.array([1.0], np.float32)
    a0 = np.array([2.0**24], np.float32)
    a1 = np.array([1.0], np.float32)
    # a0 + a1 rounds to 2**24 (ties-to-even), so p - (a0 + a1) = 1 - 2**24;
    # (p - a0) - a1 would be (1 - 2**24) - 1 = -2**24.
    np.testing.assert_array_equal(reference.subtract_decode(p, [a0, a1]), [1.0 - 2.0**24])


def test_out_is_written_in_place():
    xs = _xs(1, 2, (2, 4))
    out = np.full((2, 4), np.nan, np.float32)
    assert reference.sum_encode(xs, out) is out
    assert not np.isnan(out).any()
    assert reference.subtract_decode(xs[0], xs[1:], out) is out
    np.testing.assert_array_equal(out, xs[0] - xs[1])
