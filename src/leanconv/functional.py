"""Functional form of leanconv's operations: one function per op, ``backend=``.

HetConv: Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for
Deep CNNs", CVPR 2019, https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import torch

from .ops.conv_geometry import (
    PADDING_MODES,
    DepthwiseGeometry,
    HetConvGeometry,
    normalize_kernel_size,
    normalize_pair,
    normalize_padding,
    pad_for_mode,
)
from .ops.dispatch import dispatch_call
from .ops.hetconv_layout import check_hetconv_channels, check_layout

__all__ = ["het_conv2d", "depthwise_conv2d"]


def _hetconv_geometry(input, weight, pointwise_weight, bias, stride, padding, dilation, p, layout) -> HetConvGeometry:
    check_layout(layout)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (N, M/P, kh, kw), got shape {tuple(weight.shape)}")
    out_channels, per_group = int(weight.shape[0]), int(weight.shape[1])
    kernel_size = normalize_kernel_size(tuple(weight.shape[2:]))
    stride = normalize_pair(stride, "stride")
    dilation = normalize_pair(dilation, "dilation")
    padding = normalize_padding(padding, kernel_size, stride, dilation)
    in_channels = per_group * p
    check_hetconv_channels(in_channels, out_channels, p)
    if tuple(pointwise_weight.shape) != (out_channels, in_channels - per_group):
        raise ValueError(
            f"pointwise_weight must have shape (N, M - M/P) = {(out_channels, in_channels - per_group)}, "
            f"got {tuple(pointwise_weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    if input.dim() not in (3, 4):
        raise ValueError(f"het_conv2d: expected a 3-D or 4-D input, got shape {tuple(input.shape)}")
    if input.shape[-3] != in_channels:
        raise ValueError(
            f"het_conv2d: expected input with {in_channels} channels (weight.shape[1] * p), got {input.shape[-3]}"
        )
    return HetConvGeometry(in_channels, out_channels, kernel_size, stride, padding, dilation, p, layout)


def het_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    *,
    p: int,
    layout: str = "blocked",
    padding_mode: str = "zeros",
    backend: str | None = None,
) -> torch.Tensor:
    """HetConv of ``input`` (B, M, H, W) or (M, H, W) -> (B, N, Ho, Wo) or (N, Ho, Wo).

    Args:
        weight: (N, M/P, kh, kw) KxK kernels; ``weight[n, j]`` acts on input
            channel ``kxk_channel_index[n, j]`` of the layout (odd kh, kw).
        pointwise_weight: (N, M - M/P) 1x1 kernels on the remaining channels,
            in increasing channel order, applied at each window's centre tap.
        bias: optional (N,).
        p: the part P (divides M and N); ``layout``: "blocked" or "shifted".
        backend: "auto", "reference", "split", "triton" or a registered backend
            (``None``: the configuration in force, see ``leanconv.config``).

    Cost: Ho*Wo*N*(M/P*kh*kw + M - M/P) MACs per image (FLOPs = 2 x MACs).

    Example::

        x, w, pw = torch.randn(2, 8, 9, 9), torch.randn(16, 2, 3, 3), torch.randn(16, 6)
        y = leanconv.functional.het_conv2d(x, w, pw, padding=1, p=4)
        assert y.shape == (2, 16, 9, 9)
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    geometry = _hetconv_geometry(input, weight, pointwise_weight, bias, stride, padding, dilation, p, layout)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    x, conv_padding = pad_for_mode(x, geometry.padding, padding_mode)
    geometry = geometry._replace(padding=conv_padding)
    out = dispatch_call("hetconv", x, (weight, pointwise_weight), bias, geometry, backend)
    return out.squeeze(0) if unbatched else out


def depthwise_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Depthwise convolution of ``input`` (B, C, H, W) or (C, H, W) with a (C*D, 1, kh, kw)
    ``weight``: ``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C)``,
    run by ``backend`` (``"auto"``, ``"torch"``, ``"triton"``; see ``leanconv.ops.backends``).

    Cost: Ho*Wo*C*D*kh*kw MACs per image (FLOPs = 2 x MACs).

    Example::

        y = leanconv.functional.depthwise_conv2d(torch.randn(2, 8, 9, 9), torch.randn(8, 1, 3, 3), padding=1)
        assert y.shape == (2, 8, 9, 9)
    """
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"weight must be (C*D, 1, kh, kw), got shape {tuple(weight.shape)}")
    if input.dim() not in (3, 4):
        raise ValueError(f"depthwise_conv2d: expected a 3-D or 4-D input, got shape {tuple(input.shape)}")
    channels = int(input.shape[-3])
    if channels == 0 or weight.shape[0] % channels:
        raise ValueError(
            f"depthwise_conv2d: weight.shape[0]={weight.shape[0]} must be a multiple of the input's {channels} channels"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    kernel_size = normalize_kernel_size(tuple(weight.shape[2:]), require_odd=False)
    stride = normalize_pair(stride, "stride")
    dilation = normalize_pair(dilation, "dilation")
    padding = normalize_padding(padding, kernel_size, stride, dilation)
    geometry = DepthwiseGeometry(channels, int(weight.shape[0]), kernel_size, stride, padding, dilation)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out = dispatch_call("depthwise", x, (weight,), bias, geometry, backend)
    return out.squeeze(0) if unbatched else out
