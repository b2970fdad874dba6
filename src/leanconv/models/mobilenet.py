"""MobileNet-v1 and MobileNet-v2, for CIFAR (32x32) and ImageNet (224x224).

Howard et al., "MobileNets", https://arxiv.org/abs/1704.04861; Sandler et al.,
"MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
https://arxiv.org/abs/1801.04381. ``mobilenet_v2`` follows torchvision's
``torchvision.models.mobilenet_v2`` in structure, module names and
initialisation (3,504,872 parameters with 1000 classes), so a torchvision
state_dict loads into the ``standard`` model: ``features.0.0`` (stem conv),
``features.0.1`` (its BN), ``features.<i>.conv.<j>...`` (inverted residual
blocks), ``features.18.0/1`` (last 1x1 conv, BN), ``classifier.1`` (Linear).

CIFAR variants (as in the common CIFAR ports): ``mobilenet_v1_cifar`` has a
stride-1 stem and the 13 depthwise-separable blocks of the paper (strides on
blocks 2, 4, 6, 12), 3,217,226 parameters with 10 classes; ``mobilenet_v2_cifar``
is ``mobilenet_v2``'s structure with a stride-1 stem and the second stage at
stride 1 (feature map 32 -> 4 instead of 224 -> 7), 2,236,682 parameters.

Which convolutions the conv kind replaces: none, in these four models. Their
depthwise 3x3 convs (groups == channels) and 1x1 convs (expansion, projection,
pointwise) stay standard by design, and the 3x3 stem, the only other odd-kernel
convolution, is the stem. So ``create("mobilenet_v2_cifar", conv="hetconv",
p=4)`` builds and runs but holds only standard convolutions; what the kind
still changes is the channel rounding (every count a multiple of P, or of the
GWC groups). ``leanconv.convert`` skips the same layers, with its reasons.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._builder import ConvBuilder, init_resnet_weights

__all__ = ["MobileNetV1", "MobileNetV2", "InvertedResidual", "mobilenet_v1_cifar", "mobilenet_v2_cifar",
           "mobilenet_v2"]


def conv_bn_act(builder: ConvBuilder, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                groups: int = 1, activation: type[nn.Module] = nn.ReLU6) -> nn.Sequential:
    """conv-BN-activation as ``nn.Sequential`` (names ``0``, ``1``, ``2``, like torchvision's
    Conv2dNormActivation). Never replaced: stems, depthwise and 1x1 convs only."""
    return nn.Sequential(
        builder.conv(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False,
                     replaceable=False, groups=groups),
        nn.BatchNorm2d(out_channels),
        activation(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expansion 1x1 (when t > 1), depthwise 3x3 (stride), linear projection 1x1; residual when the shape holds."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 builder: ConvBuilder) -> None:
        super().__init__()
        # in_channels is already a multiple of the divisor, so the expansion is too (torchvision: round(in * t)).
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(builder, in_channels, hidden, 1))
        layers += [
            conv_bn_act(builder, hidden, hidden, 3, stride, groups=hidden),
            builder.conv(hidden, out_channels, 1, 1, 0, bias=False, replaceable=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, channels c, repeats n, stride s) of MobileNet-v2 on ImageNet.
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))
# CIFAR: stem and the second stage at stride 1.
V2_SETTING_CIFAR = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNet-v2 (torchvision's layout): (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, num_classes: int = 1000, builder: ConvBuilder | None = None,
                 setting=V2_SETTING, stem_stride: int = 2, last_channels: int = 1280, dropout: float = 0.2,
                 default_input_size: tuple[int, int, int] = (3, 224, 224)) -> None:
        super().__init__()
        builder = builder or ConvBuilder()
        in_channels = builder.channels(32)
        # Scaled by width like every count (torchvision keeps 1280 for width_mult < 1; at
        # width != 1 channel counts differ from torchvision's anyway: it rounds to multiples of 8).
        self.last_channels = builder.channels(last_channels)
        features: list[nn.Module] = [conv_bn_act(builder, 3, in_channels, 3, stem_stride)]
        for t, c, n, s in setting:
            out_channels = builder.channels(c)
            for i in range(n):
                features.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t, builder))
                in_channels = out_channels
        features.append(conv_bn_act(builder, in_channels, self.last_channels, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channels, num_classes))
        self.num_classes = num_classes
        self.default_input_size = default_input_size
        init_resnet_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# MobileNet-v1: (output channels, stride) of the 13 depthwise-separable blocks.
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
             (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNet-v1: a 3x3 stem, 13 blocks of (depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU),
    global average pooling, Linear. Names: ``features.0`` (stem conv-BN-ReLU),
    ``features.<i>.0`` (depthwise conv-BN-ReLU), ``features.<i>.1`` (pointwise), ``classifier``."""

    def __init__(self, num_classes: int = 10, builder: ConvBuilder | None = None, stem_stride: int = 1,
                 default_input_size: tuple[int, int, int] = (3, 32, 32)) -> None:
        super().__init__()
        builder = builder or ConvBuilder()
        in_channels = builder.channels(32)
        features: list[nn.Module] = [conv_bn_act(builder, 3, in_channels, 3, stem_stride, activation=nn.ReLU)]
        for nominal, stride in V1_BLOCKS:
            out_channels = builder.channels(nominal)
            features.append(nn.Sequential(
                conv_bn_act(builder, in_channels, in_channels, 3, stride, groups=in_channels, activation=nn.ReLU),
                conv_bn_act(builder, in_channels, out_channels, 1, activation=nn.ReLU),
            ))
            in_channels = out_channels
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.num_classes = num_classes
        self.default_input_size = default_input_size
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v1_cifar(num_classes: int = 10, builder: ConvBuilder | None = None) -> MobileNetV1:
    return MobileNetV1(num_classes, builder, stem_stride=1, default_input_size=(3, 32, 32))


def mobilenet_v2_cifar(num_classes: int = 10, builder: ConvBuilder | None = None) -> MobileNetV2:
    return MobileNetV2(num_classes, builder, V2_SETTING_CIFAR, stem_stride=1, default_input_size=(3, 32, 32))


def mobilenet_v2(num_classes: int = 1000, builder: ConvBuilder | None = None) -> MobileNetV2:
    return MobileNetV2(num_classes, builder, V2_SETTING, stem_stride=2, default_input_size=(3, 224, 224))
