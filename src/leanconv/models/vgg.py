"""VGG-16 for CIFAR as in the HetConv paper.

Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs",
CVPR 2019, https://arxiv.org/abs/1903.04120 (VGG: Simonyan & Zisserman,
https://arxiv.org/abs/1409.1556).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._builder import ConvBuilder

__all__ = ["VGGCifar", "vgg16_cifar", "VGG16_CONFIG"]

# Channel widths; "M" is a 2x2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGGCifar(nn.Module):
    """VGG for 32x32 inputs: 3x3 conv + BN + ReLU blocks, five max-pools, and the
    paper's classifier Linear(512, 512), BN1d, ReLU, Linear(512, classes).

    The first convolution (on the 3 image channels) is always standard; every
    other 3x3 convolution is built by ``builder`` (HetConv, DSC, ...). Convs have
    a bias, as in the paper's VGG-16 (its cost table counts one bias add per output).

    Shapes: (B, 3, 32, 32) -> (B, num_classes). Module names: ``features.<i>``
    (conv, bn, relu, pool in order) and ``classifier.<i>``.
    """

    default_input_size = (3, 32, 32)

    def __init__(self, config=VGG16_CONFIG, num_classes: int = 10, builder: ConvBuilder | None = None) -> None:
        super().__init__()
        builder = builder or ConvBuilder()
        layers: list[nn.Module] = []
        in_channels, first = 3, True
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_channels = builder.channels(item)
            layers += [
                builder.conv(in_channels, out_channels, 3, 1, 1, bias=True, replaceable=not first),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels, first = out_channels, False
        self.features = nn.Sequential(*layers)
        hidden = builder.channels(512)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_cifar(num_classes: int = 10, builder: ConvBuilder | None = None) -> VGGCifar:
    return VGGCifar(VGG16_CONFIG, num_classes, builder)
