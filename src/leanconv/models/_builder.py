"""How zoo models build their convolutions: one conv kind for every replaceable
convolution, channel counts scaled by ``width``. The widths are said out loud:
the builder records every width it hands out, and a kind whose divisor
(HetConv's P, GWPW's groups) does not divide a replaceable convolution's
channels is recorded as a misfit (``models.create`` turns misfits into an
error naming the widths and the divisors that work) unless ``round_channels``
rounds every width to a multiple of the divisor."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn as nn

from ..layers import check_kind_options, conv_spec, make_conv

__all__ = ["ConvBuilder", "init_resnet_weights"]


@dataclass
class ConvBuilder:
    """Builds a model's convolutions.

    ``conv(in, out, k, stride, padding, bias, replaceable, groups)`` returns the
    chosen kind for a replaceable convolution (odd kernel > 1, groups == 1, not
    the stem: the caller passes ``replaceable=False`` for it) and a plain
    ``nn.Conv2d`` otherwise (1x1 and grouped/depthwise convolutions included).
    ``channels(c)`` scales a nominal channel count by ``width`` (round half up,
    at least 1; with ``round_channels`` to the nearest positive multiple of the
    divisor) and records it in ``widths``. A replaceable convolution whose
    channels the divisor does not divide is built standard and listed in
    ``misfits`` as (in_channels, out_channels).
    """

    kind: str = "standard"
    width: float = 1.0
    options: dict = field(default_factory=dict)
    round_channels: bool = False
    widths: list[int] = field(default_factory=list, init=False)
    misfits: list[tuple[int, int]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.kind not in conv_spec.CONV_KINDS:
            raise ValueError(f"conv must be one of {conv_spec.CONV_KINDS}, got {self.kind!r}")
        if (isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not self.width > 0
                or not math.isfinite(self.width)):
            raise ValueError(f"width must be a positive finite number, got {self.width!r}")
        check_kind_options(self.kind, self.options)
        self.divisor_name, self.divisor = None, 1
        key, _ = conv_spec.kind_divisor(self.kind, self.options)
        if key is not None:
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int for conv kind {self.kind!r}, got {value!r}")
            self.divisor_name, self.divisor = key, value

    def channels(self, nominal: int) -> int:
        """``nominal * width`` rounded (see the class docstring), recorded in ``widths``."""
        step = self.divisor if self.round_channels else 1
        scaled = max(step, int(math.floor(nominal * self.width / step + 0.5)) * step)
        self.widths.append(scaled)
        return scaled

    def _fits(self, in_channels: int, out_channels: int) -> bool:
        # HetConv needs P | M and P | N; GWPW's group-wise conv G | M.
        needed = (in_channels, out_channels) if self.kind == "hetconv" else (in_channels,)
        return all(c % self.divisor == 0 for c in needed)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
             padding: int | None = None, bias: bool = False, replaceable: bool = True,
             groups: int = 1) -> nn.Module:
        padding = kernel_size // 2 if padding is None else padding
        if (replaceable and groups == 1 and self.kind != "standard"
                and kernel_size > 1 and kernel_size % 2 == 1):
            if self._fits(in_channels, out_channels):
                return make_conv(self.kind, in_channels, out_channels, kernel_size, stride, padding, bias=bias,
                                 **self.options)
            self.misfits.append((in_channels, out_channels))
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
