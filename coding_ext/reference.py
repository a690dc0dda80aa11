"""Plain numpy definitions of the coding kernels.

These are the definitions: the Cython kernels (`coding_ext.sum_encode`, ...)
and the torch encoders used in training compute exactly these functions. All
arithmetic is float32 and in the order written here, so the kernels (built
without fused multiply-add) agree with these functions bit for bit.

Inputs are not validated beyond what numpy itself enforces; use the kernels
for checked calls.
"""

import numpy as np

__all__ = ["concat_encode", "subtract_decode", "sum_encode"]


def _stack(arrays):
    """A list of float32 arrays from a sequence or a stacked (k, ...) ndarray."""
    return [np.asarray(a).astype(np.float32, copy=False) for a in arrays]


def sum_encode(inputs, out=None, *, scale=None, shift=None):
    """Summation encoder.

    Args:
        inputs: k >= 2 arrays of shape (B, *S) (float32, float16 or uint8),
            or one array of shape (k, B, *S).
        out: optional float32 array of shape (B, *S) to write into.
        scale: optional float32 array of shape (C,), C = S[0] if len(S) >= 2
            else 1; channel axis = axis 1 of the batch.
        shift: optional float32 array of shape (C,).

    Returns:
        float32 array of shape (B, *S): ((x0 + x1) + x2) + ...; with scale or
        shift, sum * scale[c] + (k * shift[c]) (missing scale = 1, shift = 0).
    """
    xs = _stack(inputs)
    k = len(xs)
    total = xs[0] + xs[1]
    for x in xs[2:]:
        total = total + x
    if scale is not None or shift is not None:
        channels = total.shape[1] if total.ndim >= 3 else 1
        inner = int(np.prod(total.shape[2:] if total.ndim >= 3 else total.shape[1:]))
        view = total.reshape(total.shape[0], channels, inner)
        a = np.ones(channels, np.float32) if scale is None else np.asarray(scale, np.float32)
        s = np.zeros(channels, np.float32) if shift is None else np.asarray(shift, np.float32)
        ks = np.float32(k) * s
        total = (view * a[None, :, None] + ks[None, :, None]).reshape(total.shape)
    if out is None:
        return total
    out[...] = total
    return out


def concat_encode(inputs, out=None):
    """Concatenation encoder for images.

    Args:
        inputs: k in {2, 4} arrays of shape (B, C, H, W), or one array of shape
            (k, B, C, H, W). k = 2 needs W even, k = 4 needs H and W even.
        out: optional float32 array of shape (B, C, H, W).

    Returns:
        float32 array of shape (B, C, H, W). k = 2: d_i = (x_i[..., 0::2] +
        x_i[..., 1::2]) * 0.5 and out = [d_0 | d_1] along the width. k = 4:
        d_i = ((x[2h, 2w] + x[2h, 2w+1]) + (x[2h+1, 2w] + x[2h+1, 2w+1])) * 0.25,
        out = [[d_0, d_1], [d_2, d_3]].
    """
    xs = _stack(inputs)
    k = len(xs)
    if k == 2:
        ds = [(x[..., 0::2] + x[..., 1::2]) * np.float32(0.5) for x in xs]
        result = np.concatenate(ds, axis=-1)
    elif k == 4:
        ds = [
            ((x[..., 0::2, 0::2] + x[..., 0::2, 1::2]) + (x[..., 1::2, 0::2] + x[..., 1::2, 1::2]))
            * np.float32(0.25)
            for x in xs
        ]
        top = np.concatenate(ds[:2], axis=-1)
        bottom = np.concatenate(ds[2:], axis=-1)
        result = np.concatenate([top, bottom], axis=-2)
    else:
        raise ValueError(f"concat_encode supports k = 2 or 4, got k={k}")
    if out is None:
        return result
    out[...] = result
    return out


def subtract_decode(parity_output, available, out=None):
    """Subtraction decoder.

    Args:
        parity_output: float32 array of shape (B, *O).
        available: k-1 >= 1 float32 arrays of shape (B, *O), or one array of
            shape (k-1, B, *O).
        out: optional float32 array of shape (B, *O).

    Returns:
        float32 array parity_output - ((a0 + a1) + ...).
    """
    avail = _stack(available)
    total = avail[0]
    for a in avail[1:]:
        total = total + a
    result = np.asarray(parity_output, np.float32) - total
    if out is None:
        return result
    out[...] = result
    return out
