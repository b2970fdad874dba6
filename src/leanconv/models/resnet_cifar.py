"""He et al.'s CIFAR ResNets (ResNet-20/56/110).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385, section 4.2: a 3x3 stem conv with 16 channels,
three stages of n BasicBlocks (3x3-3x3, BN, ReLU) with 16, 32 and 64 channels,
the first block of stages 2 and 3 with stride 2, global average pooling and a
linear classifier; depth = 6n + 2.

Shortcut: option A of the paper (its choice for CIFAR): where a block changes
the shape, the identity is subsampled (stride 2) and zero-padded with the new
channels, so shortcuts carry no parameters. This gives the paper's parameter
counts (ResNet-20: 0.27M, 269,722 with 10 classes). ``ResNetCifar(...,
shortcut="B")`` uses a 1x1 projection + BN instead, as the official bsconv
package's ``cifar_resnet20`` does (272,474 parameters; the package's model has
272,480, its extra 6 are a BatchNorm on the 3 input channels).

Every 3x3 conv except the stem is built by the builder (HetConv, DSC, ...); the
1x1 projections of option B stay standard.

Module names: ``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer3.<n-1>.bn2``,
``layer<i>.0.shortcut.0/1`` (option B only), ``fc``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._builder import ConvBuilder, init_resnet_weights

__all__ = ["ResNetCifar", "BasicBlockCifar", "resnet20_cifar", "resnet56_cifar", "resnet110_cifar"]


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the channels from ``in_channels`` to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlockCifar(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, builder: ConvBuilder,
                 shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = builder.conv(in_channels, out_channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = builder.conv(out_channels, out_channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                builder.conv(in_channels, out_channels, 1, stride, 0, replaceable=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth 6n+2 for 32x32 inputs: (B, 3, 32, 32) -> (B, num_classes)."""

    default_input_size = (3, 32, 32)

    def __init__(self, depth: int = 20, num_classes: int = 10, builder: ConvBuilder | None = None,
                 shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero padding) or 'B' (1x1 projection), got {shortcut!r}")
        builder = builder or ConvBuilder()
        n = (depth - 2) // 6
        stem = builder.channels(16)
        self.conv1 = builder.conv(3, stem, 3, 1, 1, replaceable=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        in_channels = stem
        for index, (nominal, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            out_channels = builder.channels(nominal)
            blocks = []
            for b in range(n):
                blocks.append(BasicBlockCifar(in_channels, out_channels, stride if b == 0 else 1, builder, shortcut))
                in_channels = out_channels
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_classes = num_classes
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20_cifar(num_classes: int = 10, builder: ConvBuilder | None = None) -> ResNetCifar:
    return ResNetCifar(20, num_classes, builder)


def resnet56_cifar(num_classes: int = 10, builder: ConvBuilder | None = None) -> ResNetCifar:
    return ResNetCifar(56, num_classes, builder)


def resnet110_cifar(num_classes: int = 10, builder: ConvBuilder | None = None) -> ResNetCifar:
    return ResNetCifar(110, num_classes, builder)
