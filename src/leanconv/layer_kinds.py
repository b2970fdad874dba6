"""The leanconv layer kinds, defined once.

``LEANCONV_LAYERS`` are the modules leanconv builds: model surgery treats each
as one unit (``convert`` never replaces what is inside one, ``fuse`` folds BN
into each as a whole). ``CONV_KINDS`` are the names ``make_conv``, ``convert``,
the zoo and the command line accept.
"""

from __future__ import annotations

import torch.nn as nn

from .layers import (
    CONV_KINDS,
    BSConvS2d,
    BSConvU2d,
    DepthwiseConv2d,
    DSConv2d,
    GWPWConv2d,
    HetConv2d,
    SeedHetConv2d,
)

__all__ = ["CONV_KINDS", "LEANCONV_LAYERS", "is_leanconv_layer"]

LEANCONV_LAYERS: tuple[type[nn.Module], ...] = (
    HetConv2d, DepthwiseConv2d, DSConv2d, GWPWConv2d, BSConvU2d, BSConvS2d, SeedHetConv2d,
)


def is_leanconv_layer(module: nn.Module) -> bool:
    """True for an instance of one of :data:`LEANCONV_LAYERS`."""
    return isinstance(module, LEANCONV_LAYERS)
