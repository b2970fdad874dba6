"""HetConv as two library convolutions: grouped KxK plus a 1x1 with a zero diagonal.

HetConv (Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for
Deep CNNs", CVPR 2019, https://arxiv.org/abs/1903.04120).

The KxK part is a grouped convolution (groups = P) over each group's channels;
the 1x1 part is one pointwise convolution of the input under each window's
centre tap, whose (N, M) weight holds the 1x1 kernels and zeros on the channels
that already have a KxK kernel (:func:`zero_diagonal_pointwise`). Their sum is
exactly HetConv. In the shifted layout the grouped convolution reads the input
channels gathered into group order and its output is gathered back into filter
order (exported as two Gathers).

Preparation options of the same form (chosen by :mod:`leanconv.ops.dispatch`,
never changing the arithmetic):

* under autograd, and whenever a graph is traced, compiled or exported: the
  weights are built differentiably on every call and the two outputs summed
  by ``+`` (an exporter sees Conv + Conv + Add);
* eager inference: the weights are built once and cached by the layer; on
  channels-last float32/bfloat16 CPU inputs the grouped weight is packed for
  oneDNN and the grouped convolution adds itself onto the 1x1 result as a
  oneDNN post-op (no extra pass over the output), elsewhere the grouped output is
  added into the 1x1 result in place.

Cost: Ho*Wo*N*(M/P*K*K + M) MACs per image: HetConv's count plus the N*M/P zero
products of the 1x1 part's diagonal (8% above HetConv at P = 4, K = 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conv_geometry import HetConvGeometry, centre_input, reads_input_directly
from .hetconv_layout import zero_diagonal_pointwise
from . import onednn
from .registry import under_dispatch_mode

__all__ = ["SplitWeights", "zero_diagonal_pointwise", "prepare_split", "run_split", "onednn_packing"]

_CL = torch.channels_last


def _shifted_group_order(channels: int, p: int, device) -> torch.Tensor:
    """:func:`.hetconv_layout.group_channel_order` of the shifted layout (group r holds r,
    r + P, r + 2P, ...; ``p`` = C/P gives the inverse), recomputed by torch ops from Python
    ints: TorchScript tracing then records the same graph on every trace, where a cached
    index tensor would be a new constant each time (its sanity check fails). The tests
    hold it equal to the layout's tables."""
    return torch.arange(channels, device=device).view(channels // p, p).t().reshape(-1)


@dataclass
class SplitWeights:
    """The split form's weight-derived tensors.

    ``grouped``: (N, M/P, kh, kw) KxK weights in group order (oneDNN's packed
    tensor when ``packed``); ``pointwise``: (N, M, 1, 1) zero-diagonal 1x1
    weight, rows in filter order (group order when ``packed``);
    ``channel_order``/``filter_order``/``filter_inverse``: the shifted layout's
    gathers (None for blocked).
    """

    grouped: torch.Tensor
    pointwise: torch.Tensor
    channel_order: torch.Tensor | None
    filter_order: torch.Tensor | None
    filter_inverse: torch.Tensor | None
    packed: bool = False
    # when packed: the same weights unpacked, for calls under a torch dispatch mode (FlopCounterMode
    # and the like do not know oneDNN's ops)
    unpacked: "SplitWeights | None" = None


def onednn_packing(x: torch.Tensor, plan) -> bool:
    """Whether an inference call packs the grouped weight for oneDNN and fuses the
    add as a post-op: cached eager inference, CPU, channels-last, float32/bfloat16."""
    if not (plan.cache and plan.channels_last and x.device.type == "cpu" and torch.backends.mkldnn.is_available()):
        return False
    if plan.compute_dtype == torch.bfloat16:  # oneDNN's bf16 path needs AVX512-BW/VL/DQ or AVX-NE-CONVERT
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return plan.compute_dtype == torch.float32


def prepare_split(params, geometry: HetConvGeometry, plan, input_shape) -> SplitWeights:
    """Build :class:`SplitWeights` from ``(weight, pointwise_weight)``
    (differentiable unless packed for oneDNN)."""
    weight, pointwise_weight = params
    g = geometry
    matrix = zero_diagonal_pointwise(pointwise_weight, g.in_channels, g.out_channels, g.p, g.layout)
    grouped, pointwise = weight, matrix[:, :, None, None]
    channel_order = filter_order = filter_inverse = None
    if g.layout == "shifted" and g.p > 1:
        channel_order = _shifted_group_order(g.in_channels, g.p, weight.device)
        filter_order = _shifted_group_order(g.out_channels, g.p, weight.device)
        filter_inverse = _shifted_group_order(g.out_channels, g.out_channels // g.p, weight.device)
        grouped = weight.index_select(0, filter_order)
    packed = g.p > 1 and onednn_packing(weight, plan)
    unpacked = None
    if packed:
        unpacked = SplitWeights(grouped, pointwise, channel_order, filter_order, filter_inverse)
        grouped = onednn.prepack(grouped, g.padding, g.stride, g.dilation, g.p, input_shape)
        if filter_order is not None:
            pointwise = pointwise.index_select(0, filter_order)
        pointwise = pointwise.detach().contiguous(memory_format=_CL)
    return SplitWeights(grouped, pointwise, channel_order, filter_order, filter_inverse, packed, unpacked)


def run_split(x: torch.Tensor, w: SplitWeights, bias, geometry: HetConvGeometry, plan) -> torch.Tensor:
    """HetConv of a (B, M, H, W) input (zero padding) -> (B, N, Ho, Wo); the
    output has the input's memory format, as ``nn.Conv2d``'s does."""
    g = geometry
    if g.p == 1:
        return F.conv2d(x, w.grouped, bias, g.stride, g.padding, g.dilation)
    direct = reads_input_directly(g.kernel_size, g.stride, g.padding, g.dilation)
    # the 1x1 part reads the input under each window's centre: a strided 1x1 convolution
    taps = x if direct else centre_input(x, g.kernel_size, g.stride, g.padding, g.dilation)
    if w.packed and under_dispatch_mode():
        w = w.unpacked
    grouped_input = x if w.channel_order is None else x.index_select(1, w.channel_order)
    if w.packed:
        if w.filter_order is not None:
            grouped_input = grouped_input.contiguous(memory_format=_CL)
            if bias is not None:
                bias = bias.index_select(0, w.filter_order)
        acc = F.conv2d(taps.contiguous(memory_format=_CL), w.pointwise, bias, g.stride)
        out = onednn.conv2d_accumulate_(acc, grouped_input, w.grouped, g.padding, g.stride, g.dilation, g.p)
        if w.filter_inverse is not None:
            out = out.index_select(1, w.filter_inverse).contiguous(memory_format=_CL)
        return out
    grouped = F.conv2d(grouped_input, w.grouped, None, g.stride, g.padding, g.dilation, g.p)
    if w.filter_inverse is not None:
        grouped = grouped.index_select(1, w.filter_inverse)
    pointwise = F.conv2d(taps, w.pointwise, bias, g.stride)
    if plan.cache:
        # Eager inference: accumulate in place, one output-sized tensor less.
        out = pointwise.add_(grouped)
    else:
        out = grouped + pointwise
    if plan.channels_last and not out.is_contiguous(memory_format=_CL):
        out = out.contiguous(memory_format=_CL)
    return out
