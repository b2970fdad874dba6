"""HetConv as two library convolutions: grouped KxK plus a 1x1 on the rest.

The KxK part is a grouped convolution (groups = P) over each group's channels;
the 1x1 part is one pointwise convolution, applied to the input under each
window's centre tap, whose (N, M) weight holds the 1x1 kernels and zeros on the
channels that already have a KxK kernel. The sum is exactly HetConv in both
layouts (for ``shifted`` the input channels are gathered into group order for
the grouped convolution and its outputs scattered back).

Cost: Ho*Wo*N*(M/P*K*K + M) MACs per image: HetConv's count plus the N*M/P
zero products of the pointwise part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv_geometry import centre_taps
from .hetconv_fused import pointwise_matrix
from .hetconv_layout import group_channel_order, group_filter_order

__all__ = ["hetconv_split"]


def hetconv_split(
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
    out_channels = weight.shape[0]
    in_channels = x.shape[1]
    kernel_size = (weight.shape[2], weight.shape[3])
    if layout == "blocked" or p == 1:
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups=p)
    else:
        channel_order = group_channel_order(in_channels, out_channels, p, layout, x.device)
        filter_order = group_filter_order(in_channels, out_channels, p, layout, x.device)
        grouped = F.conv2d(
            x.index_select(1, channel_order), weight.index_select(0, filter_order), None, stride, padding, dilation, groups=p
        )
        out = grouped.index_select(1, torch.argsort(filter_order))
    if p == 1:
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    matrix = pointwise_matrix(pointwise_weight, in_channels, p, layout)
    taps = centre_taps(x, kernel_size, stride, padding, dilation)
    return out + F.conv2d(taps, matrix[:, :, None, None], bias)
