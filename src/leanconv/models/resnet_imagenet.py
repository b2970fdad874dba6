"""ImageNet ResNet-18/34/50 with torchvision's structure and module names.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385; the layout, names and initialisation follow
torchvision's ``torchvision.models.resnet`` (ResNet-50 is "v1.5": the stride sits
on the 3x3 conv of the bottleneck), so a torchvision state_dict loads into the
``standard`` models: ``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0`` (1x1 conv) / ``.1`` (BN), ``fc``.

Parameters with 1000 classes: ResNet-18 11,689,512, ResNet-34 21,797,672,
ResNet-50 25,557,032. Input (3, 224, 224); any size >= 32 works (adaptive pooling).

Every 3x3 conv is built by the builder (HetConv, DSC, ...), strided ones included;
the 7x7 stem, the bottleneck 1x1 convs and the 1x1 downsample convs stay standard.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._builder import ConvBuilder, init_resnet_weights

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None,
                 builder: ConvBuilder) -> None:
        super().__init__()
        self.conv1 = builder.conv(in_channels, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = builder.conv(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None,
                 builder: ConvBuilder) -> None:
        super().__init__()
        self.conv1 = builder.conv(in_channels, planes, 1, 1, 0, replaceable=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = builder.conv(planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = builder.conv(planes, planes * self.expansion, 1, 1, 0, replaceable=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet: (B, 3, H, W) -> (B, num_classes)."""

    default_input_size = (3, 224, 224)

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000, builder: ConvBuilder | None = None) -> None:
        super().__init__()
        builder = builder or ConvBuilder()
        self.in_channels = builder.channels(64)
        self.conv1 = builder.conv(3, self.in_channels, 7, 2, 3, replaceable=False)
        self.bn1 = nn.BatchNorm2d(self.in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, builder)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, builder)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, builder)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, builder)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.in_channels, num_classes)
        self.num_classes = num_classes
        init_resnet_weights(self)

    def _make_layer(self, block, nominal_planes: int, blocks: int, stride: int, builder: ConvBuilder) -> nn.Sequential:
        planes = builder.channels(nominal_planes)
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(
                builder.conv(self.in_channels, out_channels, 1, stride, 0, replaceable=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [block(self.in_channels, planes, stride, downsample, builder)]
        self.in_channels = out_channels
        layers += [block(self.in_channels, planes, 1, None, builder) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, builder: ConvBuilder | None = None) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, builder)


def resnet34(num_classes: int = 1000, builder: ConvBuilder | None = None) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, builder)


def resnet50(num_classes: int = 1000, builder: ConvBuilder | None = None) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, builder)
