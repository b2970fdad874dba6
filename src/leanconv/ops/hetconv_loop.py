"""HetConv in the P-branch form of public implementations (a baseline).

For each of the P groups: a KxK convolution of the group's channels plus a 1x1
convolution of the other channels, for the group's filters; the outputs are
interleaved back into filter order. Exact in both layouts, with 2P library
convolutions plus gathers and copies; kept to measure against, not to use.

Cost: exactly HetConv's Ho*Wo*N*(M/P*K*K + M - M/P) MACs per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv_geometry import centre_taps
from .hetconv_layout import group_channel_order, group_filter_order, pointwise_channel_index

__all__ = ["hetconv_loop"]


def hetconv_loop(
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
    out_channels, per_group = weight.shape[:2]
    in_channels = x.shape[1]
    kernel_size = (weight.shape[2], weight.shape[3])
    filters_per_group = out_channels // p
    channel_order = group_channel_order(in_channels, out_channels, p, layout, x.device)
    filter_order = group_filter_order(in_channels, out_channels, p, layout, x.device)
    pointwise_index = pointwise_channel_index(in_channels, out_channels, p, layout, x.device)
    taps = centre_taps(x, kernel_size, stride, padding, dilation) if p > 1 else None
    branches = []
    for g in range(p):
        filters = filter_order[g * filters_per_group : (g + 1) * filters_per_group]
        channels = channel_order[g * per_group : (g + 1) * per_group]
        branch_bias = None if bias is None else bias.index_select(0, filters)
        out = F.conv2d(x.index_select(1, channels), weight.index_select(0, filters), branch_bias, stride, padding, dilation)
        if p > 1:
            # Every filter of a group shares the same complementary channels.
            others = pointwise_index[filters[0]]
            pointwise = pointwise_weight.index_select(0, filters)[:, :, None, None]
            out = out + F.conv2d(taps.index_select(1, others), pointwise)
        branches.append(out)
    grouped = torch.cat(branches, dim=1)
    return grouped.index_select(1, torch.argsort(filter_order))
