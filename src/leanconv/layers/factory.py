"""Build any leanconv convolution kind from nn.Conv2d-style arguments.

The one place that maps a kind name ("standard", "hetconv", "dsc", "bsconv_u",
"bsconv_s", "gwpw": every class that registers one, see
:class:`~leanconv.layers.LeanConvLayer`) and its options to a layer; the model zoo and
model conversion both build their layers here.
"""

from __future__ import annotations

import torch.nn as nn

from . import blueprint, hetconv, separable  # noqa: F401  (each kind registers itself on definition)
from .conv_spec import check_kind_options, kind_class, resolve_conv

__all__ = ["make_conv", "check_kind_options"]

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
    """A convolution of ``kind`` (a kind name or a spec such as ``"hetconv:p=4,layout=shifted"``)
    with nn.Conv2d's arguments and the kind's options; keyword options join the
    spec's, and one that contradicts it is an error.

    Example::

        conv = make_conv("hetconv", 64, 64, 3, padding=1, p=4)
        conv = make_conv("gwpw:g=4", 64, 128, 3, stride=2, padding=1)
    """
    kind, options = resolve_conv(kind, options)
    args = (in_channels, out_channels, kernel_size, stride, padding, dilation)
    common = dict(bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
    cls = kind_class(kind)
    return nn.Conv2d(*args, **common) if cls is None else cls.from_spec(*args, **common, **options)
