"""The torch encoders used in training equal the serving coder (coding_ext) exactly."""

import numpy as np
import pytest
import torch

import coding_ext
from coding_ext import reference
from models import encoders, train


def _inputs(k, shape, seed):
    rng = np.random.default_rng(seed)
    # Values like real examples: [0, 1] with a fine grid of levels.
    return rng.random((k, *shape), dtype=np.float32)


SUM_CASES = [(k, shape) for k in (2, 3, 4, 5) for shape in ((7, 1, 28, 28), (3, 3, 32, 32), (5, 10))]
CONCAT_CASES = [(k, shape) for k in (2, 4) for shape in ((7, 1, 28, 28), (3, 3, 32, 32), (2, 1, 8, 8))]


@pytest.mark.parametrize("k,shape", SUM_CASES)
def test_sum_encode_equals_coding_ext_bit_for_bit(k, shape):
    x = _inputs(k, shape, seed=k)
    got = encoders.sum_encode(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, reference.sum_encode(x))
    np.testing.assert_array_equal(got, coding_ext.sum_encode(x))
    np.testing.assert_array_equal(got, coding_ext.sum_encode([a for a in x]))


@pytest.mark.parametrize("k,shape", CONCAT_CASES)
def test_concat_encode_equals_coding_ext_bit_for_bit(k, shape):
    x = _inputs(k, shape, seed=10 + k)
    got = encoders.concat_encode(torch.from_numpy(x)).numpy()
    assert got.shape == shape
    np.testing.assert_array_equal(got, reference.concat_encode(x))
    np.testing.assert_array_equal(got, coding_ext.concat_encode(x))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_subtract_decode_equals_coding_ext_bit_for_bit(k):
    rng = np.random.default_rng(k)
    parity = (rng.standard_normal((9, 10)) * 20).astype(np.float32)
    available = (rng.standard_normal((k - 1, 9, 10)) * 10).astype(np.float32)
    got = encoders.subtract_decode(torch.from_numpy(parity), torch.from_numpy(available)).numpy()
    np.testing.assert_array_equal(got, reference.subtract_decode(parity, available))
    np.testing.assert_array_equal(got, coding_ext.subtract_decode(parity, available))


def test_sum_then_decode_recovers_an_input():
    x = _inputs(3, (4, 10), seed=3)
    total = encoders.sum_encode(torch.from_numpy(x))
    recovered = encoders.subtract_decode(total, torch.from_numpy(x[[0, 2]])).numpy()
    np.testing.assert_allclose(recovered, x[1], atol=1e-6)


def test_concat_k2_layout():
    # Example i is filled with the constant i + 1: the left half comes from example 0.
    x = np.stack([np.full((1, 1, 4, 6), i + 1, np.float32) for i in range(2)])
    out = encoders.concat_encode(torch.from_numpy(x)).numpy()[0, 0]
    np.testing.assert_array_equal(out[:, :3], 1.0)
    np.testing.assert_array_equal(out[:, 3:], 2.0)


def test_concat_k4_layout():
    x = np.stack([np.full((1, 1, 4, 4), i + 1, np.float32) for i in range(4)])
    out = encoders.concat_encode(torch.from_numpy(x)).numpy()[0, 0]
    np.testing.assert_array_equal(out, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


@pytest.mark.parametrize("encoder,k", [("sum", 2), ("sum", 3), ("concat", 2), ("concat", 4)])
def test_channel_c_of_a_query_depends_only_on_channel_c_of_each_image(encoder, k):
    """The original reshaped channel planes of different images together; here they never mix."""
    x = _inputs(k, (2, 3, 8, 8), seed=20 + k)
    base = encoders.encode(encoder, torch.from_numpy(x)).numpy()
    for image in range(k):
        for channel in range(3):
            perturbed = x.copy()
            perturbed[image, :, channel] += 1.0
            out = encoders.encode(encoder, torch.from_numpy(perturbed)).numpy()
            changed = [c for c in range(3) if not np.array_equal(out[:, c], base[:, c])]
            assert changed == [channel], (image, channel, changed)


class _LinearBase(torch.nn.Module):
    """A deterministic stand-in for a base model: sums each channel's pixels."""

    def forward(self, x):
        return x.sum(dim=(2, 3))


@pytest.mark.parametrize("encoder,k", [("sum", 3), ("concat", 2), ("concat", 4)])
def test_training_batches_are_the_serving_encoding_of_each_group(encoder, k):
    """parity_batch groups 3-channel images correctly and encodes them as coding_ext does."""
    rng = np.random.default_rng(5)
    X = rng.random((12, 3, 8, 8), dtype=np.float32)
    groups = torch.from_numpy(rng.permutation(12)[: 3 * k].reshape(3, k))
    queries, targets = train.parity_batch(_LinearBase(), torch.from_numpy(X), groups, encoder)
    members = np.stack([X[groups[:, i].numpy()] for i in range(k)])   # (k, B, C, H, W)
    serve = coding_ext.sum_encode if encoder == "sum" else coding_ext.concat_encode
    np.testing.assert_array_equal(queries.numpy(), serve(members))
    np.testing.assert_allclose(targets.numpy(), members.sum(axis=(0, 3, 4)), rtol=1e-5)


@pytest.mark.parametrize("encoder,k,shape,message", [
    ("concat", 3, (1, 28, 28), "k in"),
    ("concat", 2, (1, 28, 27), "even"),
    ("xor", 2, (1, 28, 28), "unknown encoder"),
    ("sum", 1, (1, 28, 28), "k must be"),
])
def test_bad_encoder_arguments_are_rejected(encoder, k, shape, message):
    with pytest.raises(encoders.EncoderError, match=message):
        encoders.check(encoder, k, shape)
