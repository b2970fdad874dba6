"""How zoo models build their convolutions: one conv kind for every replaceable
convolution, channel counts scaled by ``width`` and rounded so the kind's
divisor (HetConv's P, GWC's groups) divides them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn as nn

from ..layers.factory import CONV_KINDS, check_kind_options, make_conv

__all__ = ["ConvBuilder"]


@dataclass
class ConvBuilder:
    """Builds a model's convolutions.

    ``conv(in, out, k, stride, padding, bias)`` returns the chosen kind for a
    replaceable convolution (odd kernel > 1, groups == 1, not the stem) and a
    plain ``nn.Conv2d`` otherwise. ``channels(c)`` scales a nominal channel
    count by ``width`` and rounds it to the nearest positive multiple of
    ``divisor`` (the HetConv part P or the GWC groups, else 1).
    """

    kind: str = "standard"
    width: float = 1.0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CONV_KINDS:
            raise ValueError(f"conv must be one of {CONV_KINDS}, got {self.kind!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not self.width > 0:
            raise ValueError(f"width must be a positive number, got {self.width!r}")
        check_kind_options(self.kind, self.options)
        if self.kind == "hetconv":
            self.divisor = int(self.options["p"])
        elif self.kind == "gwpw":
            self.divisor = int(self.options.get("groups", self.options.get("g")))
        else:
            self.divisor = 1

    def channels(self, nominal: int) -> int:
        """round(nominal * width) rounded to the nearest multiple of the divisor (>= divisor)."""
        scaled = nominal * self.width
        return max(self.divisor, int(math.floor(scaled / self.divisor + 0.5)) * self.divisor)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
             padding: int | None = None, bias: bool = False, replaceable: bool = True) -> nn.Module:
        padding = kernel_size // 2 if padding is None else padding
        if replaceable and self.kind != "standard" and kernel_size > 1 and kernel_size % 2 == 1:
            return make_conv(self.kind, in_channels, out_channels, kernel_size, stride, padding, bias=bias,
                             **self.options)
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
