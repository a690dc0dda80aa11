"""Architectures: output shapes for their inputs, normalisation, bad names."""

import pytest
import torch

from models import archs


@pytest.mark.parametrize("arch,shape", [
    ("mlp", (1, 28, 28)), ("tinymlp", (1, 28, 28)), ("lenet5", (1, 28, 28)), ("lenet5", (1, 8, 8)),
    ("lenet5", (3, 32, 32)), ("resnet18", (3, 32, 32)), ("resnet18", (3, 224, 224)),
    ("mobilenetv2", (3, 32, 32)), ("mobilenetv2", (3, 224, 224)), ("mobilenetv2", (1, 28, 28)),
])
def test_output_shape(arch, shape):
    torch.manual_seed(0)
    net = archs.build(arch, shape, 10).eval()
    with torch.no_grad():
        out = net(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_parameter_counts_match_the_published_architectures():
    assert archs.count_parameters(archs.build("mlp", (1, 28, 28))) == 784 * 200 + 200 + 200 * 100 + 100 + 1010
    assert archs.count_parameters(archs.build("lenet5", (1, 28, 28))) == 61706
    # torchvision's resnet18 with a 10-way head has 11,181,642 parameters; the
    # CIFAR stem (3x3 instead of 7x7) has 9,408 - 1,728 fewer.
    assert archs.count_parameters(archs.build("resnet18", (3, 224, 224))) == 11181642
    assert archs.count_parameters(archs.build("resnet18", (3, 32, 32))) == 11181642 - 9408 + 1728
    # Width 0.25 is about a tenth of MobileNetV2-1.0 (2.2M without the 1000-way head).
    assert archs.count_parameters(archs.build("mobilenetv2", (3, 32, 32))) < 400_000
    assert archs.count_parameters(archs.build("tinymlp", (1, 28, 28))) == 784 * 32 + 32 + 330


def test_normalized_applies_per_channel_mean_and_std_first():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.flatten(1)[:, :10]

    model = archs.Normalized(Probe(), [0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    x = torch.rand(4, 3, 5, 5)
    model(x)
    want = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25, x[:, 2] / 2.0], 1)
    torch.testing.assert_close(seen["x"], want)


def test_unknown_arch_and_impossible_input_are_rejected():
    with pytest.raises(archs.ArchError, match="'vgg99'"):
        archs.build("vgg99", (1, 28, 28))
    with pytest.raises(archs.ArchError, match="square"):
        archs.build("lenet5", (1, 28, 14))
    with pytest.raises(archs.ArchError, match="lenet5 cannot take"):
        archs.build("lenet5", (1, 2, 2))
