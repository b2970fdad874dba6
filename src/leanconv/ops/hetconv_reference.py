"""The readable statement of HetConv: one dense convolution.

HetConv (https://arxiv.org/abs/1903.04120) equals an ordinary KxK convolution
whose (N, M, K, K) weight is zero except on each filter's KxK channels and at
the centre tap of its other channels. This backend builds exactly that weight
and calls ``F.conv2d`` once; every other backend is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hetconv_layout import materialize_dense_weight

__all__ = ["hetconv_reference"]


def hetconv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    p: int,
    layout: str,
) -> torch.Tensor:
    """HetConv of a (B, M, H, W) input (zero padding) -> (B, N, Ho, Wo).

    Cost of the call: Ho*Wo*N*M*K*K MACs per image (the dense convolution), not
    HetConv's own count; this path is for checking, not for speed.
    """
    dense = materialize_dense_weight(weight, pointwise_weight, p, layout)
    return F.conv2d(x, dense, bias, stride, padding, dilation)
