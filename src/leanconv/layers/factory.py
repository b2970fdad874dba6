"""Build any leanconv convolution kind from nn.Conv2d-style arguments.

The one place that maps a kind name ("standard", "hetconv", "dsc", "bsconv_u",
"bsconv_s", "gwpw") and its options to a layer; the model zoo and model
conversion both build their layers here.
"""

from __future__ import annotations

import torch.nn as nn

from .blueprint import BSConvS2d, BSConvU2d
from .hetconv import HetConv2d
from .separable import DSConv2d, GWPWConv2d

__all__ = ["CONV_KINDS", "KIND_OPTIONS", "make_conv", "check_kind_options"]

CONV_KINDS = ("standard", "hetconv", "dsc", "bsconv_u", "bsconv_s", "gwpw")

# Options each kind accepts beyond nn.Conv2d's arguments.
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "standard": frozenset(),
    "hetconv": frozenset({"p", "layout", "backend"}),
    "dsc": frozenset({"depth_multiplier", "with_bn", "bn_kwargs", "depthwise_backend"}),
    "bsconv_u": frozenset({"with_bn", "bn_kwargs", "depthwise_backend"}),
    "bsconv_s": frozenset({"p", "min_mid_channels", "with_bn", "bn_kwargs", "depthwise_backend"}),
    "gwpw": frozenset({"groups", "g", "with_bn", "bn_kwargs"}),
}


def check_kind_options(kind: str, options: dict) -> None:
    """ValueError for an unknown kind or an option that belongs to another kind."""
    if kind not in CONV_KINDS:
        raise ValueError(f"conv kind must be one of {CONV_KINDS}, got {kind!r}")
    unknown = sorted(set(options) - KIND_OPTIONS[kind])
    if unknown:
        allowed = sorted(KIND_OPTIONS[kind]) or "none"
        raise ValueError(f"option(s) {unknown} do not apply to conv kind {kind!r} (its options: {allowed})")
    if kind == "hetconv" and options.get("p") is None:
        raise ValueError("conv kind 'hetconv' needs the option p (the HetConv part P), got none")
    if kind == "gwpw" and options.get("groups", options.get("g")) is None:
        raise ValueError("conv kind 'gwpw' needs the option groups (or g), got none")


def make_conv(
    kind: str,
    in_channels: int,
    out_channels: int,
    kernel_size=3,
    stride=1,
    padding=0,
    dilation=1,
    bias: bool = True,
    padding_mode: str = "zeros",
    *,
    device=None,
    dtype=None,
    **options,
) -> nn.Module:
    """A convolution of ``kind`` with nn.Conv2d's arguments and the kind's options.

    Example::

        conv = make_conv("hetconv", 64, 64, 3, padding=1, p=4)
        conv = make_conv("gwpw", 64, 128, 3, stride=2, padding=1, g=4)
    """
    check_kind_options(kind, options)
    args = (in_channels, out_channels, kernel_size, stride, padding, dilation)
    common = dict(bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
    if kind == "standard":
        return nn.Conv2d(*args, **common)
    if kind == "hetconv":
        return HetConv2d(*args, **common, **options)
    if kind == "dsc":
        return DSConv2d(*args, **common, **options)
    if kind == "bsconv_u":
        return BSConvU2d(*args, **common, **options)
    if kind == "bsconv_s":
        return BSConvS2d(*args, **common, **options)
    groups = options.pop("groups", None)
    groups = options.pop("g", None) if groups is None else groups
    return GWPWConv2d(*args, **common, groups=groups, **options)
