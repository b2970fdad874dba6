"""How zoo models build their convolutions: one conv kind for every replaceable
convolution, channel counts scaled by ``width`` and rounded so the kind's
divisor (HetConv's P, GWC's groups) divides them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn as nn

from ..layers.factory import CONV_KINDS, check_kind_options, make_conv

__all__ = ["ConvBuilder", "init_resnet_weights"]


@dataclass
class ConvBuilder:
    """Builds a model's convolutions.

    ``conv(in, out, k, stride, padding, bias, replaceable, groups)`` returns the
    chosen kind for a replaceable convolution (odd kernel > 1, groups == 1, not
    the stem: the caller passes ``replaceable=False`` for it) and a plain
    ``nn.Conv2d`` otherwise (1x1 and grouped/depthwise convolutions included). ``channels(c)`` scales a nominal channel
    count by ``width`` and rounds it to the nearest positive multiple of
    ``divisor`` (the HetConv part P or the GWC groups, else 1).
    """

    kind: str = "standard"
    width: float = 1.0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CONV_KINDS:
            raise ValueError(f"conv must be one of {CONV_KINDS}, got {self.kind!r}")
        if (isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not self.width > 0
                or not math.isfinite(self.width)):
            raise ValueError(f"width must be a positive finite number, got {self.width!r}")
        check_kind_options(self.kind, self.options)
        self.divisor = 1
        if self.kind in ("hetconv", "gwpw"):
            key = "p" if self.kind == "hetconv" else ("groups" if "groups" in self.options else "g")
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int for conv kind {self.kind!r}, got {value!r}")
            self.divisor = value

    def channels(self, nominal: int) -> int:
        """round(nominal * width) rounded to the nearest multiple of the divisor (>= divisor)."""
        scaled = nominal * self.width
        return max(self.divisor, int(math.floor(scaled / self.divisor + 0.5)) * self.divisor)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
             padding: int | None = None, bias: bool = False, replaceable: bool = True,
             groups: int = 1) -> nn.Module:
        padding = kernel_size // 2 if padding is None else padding
        if (replaceable and groups == 1 and self.kind != "standard"
                and kernel_size > 1 and kernel_size % 2 == 1):
            return make_conv(self.kind, in_channels, out_channels, kernel_size, stride, padding, bias=bias,
                             **self.options)
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, groups=groups)


def init_resnet_weights(model: nn.Module) -> None:
    """He (fan_out) init for the model's own ``nn.Conv2d`` layers, BN to (1, 0),
    as torchvision's ResNets and MobileNets do. The convolutions inside leanconv
    layers (HetConv, DSC, BSConv, GWPW) keep the layers' own initialisation;
    linear layers keep PyTorch's default."""
    inside = set()
    for module in model.modules():
        if type(module).__module__.startswith("leanconv.layers"):
            inside.update(id(m) for m in module.modules())
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module) is nn.Conv2d:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
