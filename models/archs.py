"""Network architectures, in plain torch (no torchvision).

Every network takes a batch of *normalised* examples (N, C, H, W) and returns
raw outputs (logits) (N, num_classes). ``Normalized`` wraps a network with the
per-channel normalisation, so that the exported graph takes raw [0, 1]
examples. ``build(arch, input_shape, num_classes)`` is the one constructor.

- ``mlp``: 784-200-100-10 for MNIST (input flattened, ReLU).
- ``lenet5``: conv5(6) - pool - conv5(16) - pool - 120 - 84 - 10 (ReLU, max
  pooling); inputs smaller than 28x28 get padded convolutions.
- ``lenet5-wide``: LeNet-5's topology with 16 and 32 channels and 512-256
  fully connected units: the default MNIST base model, because its parity
  model (same architecture) must recognise k digits in one query, and
  LeNet-5's 84-unit bottleneck cannot hold k = 4 of them (docs/models.md).
- ``resnet18``: He et al. 2016, BasicBlock [2, 2, 2, 2]. Inputs up to 64x64
  (CIFAR-style) use a 3x3 stride-1 stem without max pooling; larger inputs
  (224x224) use the ImageNet 7x7 stride-2 stem and max pooling.
- ``mobilenetv2``: Sandler et al. 2018, width multiplier 0.25 (the cheap
  backup for images); small inputs get stride 1 in the stem.
- ``tinymlp``: flatten - 32 - 10, the cheap backup for MNIST-sized inputs.
"""

import math

import torch
from torch import nn

ARCHS = ("mlp", "lenet5", "lenet5-wide", "resnet18", "mobilenetv2", "tinymlp")


class ArchError(ValueError):
    """An unknown architecture, or one that cannot take the given input."""


class Normalized(nn.Module):
    """(x - mean) / std per channel, then the network. Input: raw examples (N, C, H, W)."""

    def __init__(self, net, mean, std):
        super().__init__()
        channels = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, channels, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).reshape(1, channels, 1, 1))
        self.net = net

    def forward(self, x):
        return self.net((x - self.mean) * self.inv_std)


class MLP(nn.Module):
    def __init__(self, in_features, hidden, num_classes):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class LeNet5(nn.Module):
    def __init__(self, in_channels, size, num_classes, channels=(6, 16), hidden=(120, 84)):
        super().__init__()
        c1, c2 = channels
        h1, h2 = hidden
        # 28x28: 28 -conv(p2)-> 28 -pool-> 14 -conv-> 10 -pool-> 5.
        # Smaller inputs keep their size through both convolutions.
        pad2 = 0 if size >= 28 else 2
        side = ((size // 2) - (4 - 2 * pad2)) // 2
        if side < 1:
            raise ArchError(f"lenet5 cannot take {size}x{size} inputs")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=pad2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, h1), nn.ReLU(inplace=True),
            nn.Linear(h1, h2), nn.ReLU(inplace=True), nn.Linear(h2, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, in_channels, size, num_classes):
        super().__init__()
        if size <= 64:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        blocks, planes = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(planes, width, stride), BasicBlock(width, width, 1)]
            planes = width
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def _divisible(value, divisor=8):
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
    def __init__(self, inp, out, stride, expand):
        super().__init__()
        hidden = inp * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride), as in the paper.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_channels, size, num_classes, width=0.25):
        super().__init__()
        small = size <= 64
        channels = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        layers = [nn.Conv2d(in_channels, channels, 3, 1 if small else 2, 1, bias=False),
                  nn.BatchNorm2d(channels), nn.ReLU6(inplace=True)]
        for i, (t, c, n, s) in enumerate(self.SETTINGS):
            out = _divisible(c * width)
            # Small inputs: keep resolution in the first downsampling stage too.
            stride = 1 if small and i == 1 else s
            for j in range(n):
                layers.append(InvertedResidual(channels, out, stride if j == 0 else 1, t))
                channels = out
        layers += [nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(last, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build(arch, input_shape, num_classes=10):
    """The network ``arch`` for per-example inputs ``input_shape`` (C, H, W).

    Raises:
        ArchError: unknown arch, or an input it cannot take.
    """
    channels, height, width = input_shape
    if height != width:
        raise ArchError(f"{arch} needs square inputs, got {height}x{width}")
    if arch == "mlp":
        return MLP(math.prod(input_shape), (200, 100), num_classes)
    if arch == "tinymlp":
        return MLP(math.prod(input_shape), (32,), num_classes)
    if arch == "lenet5":
        return LeNet5(channels, height, num_classes)
    if arch == "lenet5-wide":
        return LeNet5(channels, height, num_classes, channels=(16, 32), hidden=(512, 256))
    if arch == "resnet18":
        return ResNet18(channels, height, num_classes)
    if arch == "mobilenetv2":
        return MobileNetV2(channels, height, num_classes)
    raise ArchError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
