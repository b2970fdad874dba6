"""Wide ResNet WRN-16-8 for CIFAR.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
https://arxiv.org/abs/1605.07146. Depth 16 = 6n + 4 with n = 2 blocks per
stage, widening factor k = 8: a 3x3 stem with 16 channels, three stages of
16k, 32k, 64k = 128, 256, 512 channels (stride 1, 2, 2), pre-activation basic
blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3, no dropout), a 1x1 projection shortcut
(applied to the activated input, as in the authors' code) where the shape
changes, then BN-ReLU, global average pooling and a linear classifier.
10,961,370 parameters with 10 classes (the paper's "11.0M").

Every 3x3 conv except the stem is built by the builder; the 1x1 projections stay
standard. Module names: ``conv1``, ``block<i>.<j>.bn1/conv1/bn2/conv2/shortcut``,
``bn``, ``fc``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._builder import ConvBuilder, init_resnet_weights

__all__ = ["WideResNetCifar", "PreActBlock", "wrn16_8_cifar"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the shortcut (identity or 1x1 projection)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, builder: ConvBuilder) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = builder.conv(in_channels, out_channels, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = builder.conv(out_channels, out_channels, 3, 1, 1)
        self.projection = stride != 1 or in_channels != out_channels
        self.shortcut = (builder.conv(in_channels, out_channels, 1, stride, 0, replaceable=False)
                         if self.projection else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        residual = self.shortcut(activated) if self.shortcut is not None else x
        out = self.conv1(activated)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + residual


class WideResNetCifar(nn.Module):
    """WRN-d-k for 32x32 inputs: (B, 3, 32, 32) -> (B, num_classes)."""

    default_input_size = (3, 32, 32)

    def __init__(self, depth: int = 16, widen_factor: int = 8, num_classes: int = 10,
                 builder: ConvBuilder | None = None) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth!r}")
        builder = builder or ConvBuilder()
        n = (depth - 4) // 6
        stem = builder.channels(16)
        self.conv1 = builder.conv(3, stem, 3, 1, 1, replaceable=False)
        in_channels = stem
        for index, (nominal, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            out_channels = builder.channels(nominal * widen_factor)
            blocks = []
            for b in range(n):
                blocks.append(PreActBlock(in_channels, out_channels, stride if b == 0 else 1, builder))
                in_channels = out_channels
            setattr(self, f"block{index}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_classes = num_classes
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn16_8_cifar(num_classes: int = 10, builder: ConvBuilder | None = None) -> WideResNetCifar:
    return WideResNetCifar(16, 8, num_classes, builder)
