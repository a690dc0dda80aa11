"""The serving encoders and decoder, in torch, for parity-model training.

These are transcriptions of ``coding_ext`` (the Cython kernels the frontend
and coder serve with), with the same arithmetic in the same order, so that a
parity model is trained on exactly the queries it is served;
``tests/models/test_encoders.py`` proves them equal to ``coding_ext`` and to
``coding_ext.reference``.

Inputs are a tensor of shape (k, B, *S) (or a sequence of k tensors of shape
(B, *S)); query ``b`` of the output encodes query ``b`` of each of the k
inputs. Channel ``c`` of the output is built from channel ``c`` of each input
only: channel planes of different images never mix.
"""

import torch

ENCODERS = ("sum", "concat")
CONCAT_KS = (2, 4)


class EncoderError(ValueError):
    """An unknown encoder or a k/shape it cannot take."""


def check(encoder, k, input_shape=None):
    """Raises EncoderError unless ``encoder`` can encode k inputs of per-example ``input_shape``."""
    if encoder not in ENCODERS:
        raise EncoderError(f"unknown encoder {encoder!r} (choose from {', '.join(ENCODERS)})")
    if not isinstance(k, int) or k < 2:
        raise EncoderError(f"k must be an integer >= 2, got {k!r}")
    if encoder == "concat":
        if k not in CONCAT_KS:
            raise EncoderError(f"the concat encoder needs k in {CONCAT_KS}, got k={k}")
        if input_shape is not None:
            if len(input_shape) != 3:
                raise EncoderError(f"the concat encoder needs (C, H, W) inputs, got {tuple(input_shape)}")
            _, height, width = input_shape
            if width % 2 or (k == 4 and height % 2):
                raise EncoderError(f"the concat encoder with k={k} needs even sides, got {height}x{width}")


def _stack(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs
    return torch.stack(list(inputs))


def sum_encode(inputs):
    """out = ((x0 + x1) + x2) + ... (float32, left to right).

    Args:
        inputs: tensor of shape (k, B, *S), or k tensors of shape (B, *S).

    Returns:
        tensor of shape (B, *S).
    """
    x = _stack(inputs)
    out = x[0].clone()
    for i in range(1, x.shape[0]):
        out = out + x[i]
    return out


def concat_encode(inputs):
    """Downsample each of k NCHW inputs and tile them into one image of the same size.

    k = 2: d_i[b,c,h,w'] = (x_i[b,c,h,2w'] + x_i[b,c,h,2w'+1]) * 0.5; d_0 is the
    left half of the output, d_1 the right half.
    k = 4: d_i[b,c,h',w'] = ((x[2h',2w'] + x[2h',2w'+1]) + (x[2h'+1,2w'] + x[2h'+1,2w'+1])) * 0.25;
    d_0 top-left, d_1 top-right, d_2 bottom-left, d_3 bottom-right.

    Args:
        inputs: tensor of shape (k, B, C, H, W), or k tensors of shape (B, C, H, W).

    Returns:
        tensor of shape (B, C, H, W).
    """
    x = _stack(inputs)
    k = x.shape[0]
    check("concat", k, tuple(x.shape[2:]))
    height, width = x.shape[-2], x.shape[-1]
    if k == 2:
        d = (x[..., 0::2] + x[..., 1::2]) * 0.5
        return torch.cat([d[0], d[1]], dim=-1)
    d = ((x[..., 0::2, 0::2] + x[..., 0::2, 1::2]) + (x[..., 1::2, 0::2] + x[..., 1::2, 1::2])) * 0.25
    top = torch.cat([d[0], d[1]], dim=-1)
    bottom = torch.cat([d[2], d[3]], dim=-1)
    out = torch.cat([top, bottom], dim=-2)
    assert out.shape[-2:] == (height, width)
    return out


def encode(encoder, inputs):
    """Applies the encoder named ``encoder`` ("sum" or "concat")."""
    if encoder == "sum":
        return sum_encode(inputs)
    if encoder == "concat":
        return concat_encode(inputs)
    raise EncoderError(f"unknown encoder {encoder!r} (choose from {', '.join(ENCODERS)})")


def subtract_decode(parity_output, available):
    """out = parity_output - ((a0 + a1) + ...): the missing output of a group.

    Args:
        parity_output: tensor of shape (B, *O), the parity model's output.
        available: tensor of shape (k-1, B, *O) (or k-1 tensors of shape (B, *O)),
            the outputs that arrived.

    Returns:
        tensor of shape (B, *O).
    """
    a = _stack(available)
    total = a[0].clone()
    for i in range(1, a.shape[0]):
        total = total + a[i]
    return parity_output - total
