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
  oneDNN post-op (no extra pass over the output), elsewhere the 1x1 result is
  added into the grouped output in place.

Cost: Ho*Wo*N*(M/P*K*K + M) MACs per image: HetConv's count plus the N*M/P zero
products of the 1x1 part's diagonal (8% above HetConv at P = 4, K = 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conv_geometry import HetConvGeometry, centre_taps, reads_input_directly
from .registry import under_dispatch_mode

__all__ = ["SplitWeights", "zero_diagonal_pointwise", "prepare_split", "run_split", "onednn_packing"]

_CL = torch.channels_last


def _insert_zero_diagonal(blocks: torch.Tensor, lead: tuple[int, ...], p: int, width: int) -> torch.Tensor:
    """(*lead, P, P-1, width) -> (*lead, P, P, width): row i gets a zero block
    inserted at position i. Built from concatenations and reshapes only (no
    indexed write), with every size a Python int, so that it is cheap to
    differentiate and both ONNX exporters fold it into a constant: flatten the
    (P, P-1) grid, view it as (P-1, P), append a zero block to each row,
    flatten, prepend one zero block, view as (P, P)."""
    factory = dict(dtype=blocks.dtype, device=blocks.device)
    grid = blocks.reshape(*lead, p - 1, p, width)
    grid = torch.cat([grid, torch.zeros(*lead, p - 1, 1, width, **factory)], dim=-2)
    grid = torch.cat([torch.zeros(*lead, 1, width, **factory), grid.reshape(*lead, (p - 1) * (p + 1), width)], dim=-2)
    return grid.reshape(*lead, p, p, width)


def zero_diagonal_pointwise(
    pointwise_weight: torch.Tensor, in_channels: int, out_channels: int, p: int, layout: str
) -> torch.Tensor:
    """(N, M) matrix: ``pointwise_weight`` (N, M - M/P) on each filter's other
    channels, zero on its own KxK channels. Differentiable; sizes come from the
    arguments, never from tensor shapes (traced graphs keep them constant).

    * blocked: filter n = g*Ng + i owns channel block g; its row is the P-1
      blocks of Mg channels with a zero block inserted at position g.
    * shifted: filter n = q*P + r owns the channels c = r (mod P); within each
      run of P consecutive channels its row has a zero inserted at position r.
    """
    mg, ng = in_channels // p, out_channels // p
    if p == 1:
        return pointwise_weight.new_zeros(out_channels, in_channels)
    if layout == "blocked":
        # (P groups, Ng filters, P-1 blocks, Mg) -> (Ng, P, P-1, Mg) -> insert -> (P, Ng, P, Mg)
        blocks = pointwise_weight.reshape(p, ng, p - 1, mg).transpose(0, 1)
        return _insert_zero_diagonal(blocks, (ng,), p, mg).transpose(0, 1).reshape(out_channels, in_channels)
    # shifted: (Ng q, P r, Mg runs, P-1) -> (Ng, Mg, P r, P-1, 1) -> insert -> (Ng, Mg, P, P)
    runs = pointwise_weight.reshape(ng, p, mg, p - 1).transpose(1, 2).unsqueeze(-1)
    matrix = _insert_zero_diagonal(runs, (ng, mg), p, 1).squeeze(-1)
    return matrix.transpose(1, 2).reshape(out_channels, in_channels)


def _group_order(channels: int, p: int, device) -> torch.Tensor:
    """The shifted layout's channels (or filters) group by group: group r holds
    r, r + P, r + 2P, ... (the same as :func:`.hetconv_layout.group_channel_order`).
    With ``p`` replaced by C/P it is the inverse permutation. Built by torch ops
    from constants, so every trace of it records the same graph."""
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
        channel_order = _group_order(g.in_channels, g.p, weight.device)
        filter_order = _group_order(g.out_channels, g.p, weight.device)
        filter_inverse = _group_order(g.out_channels, g.out_channels // g.p, weight.device)
        grouped = weight.index_select(0, filter_order)
    packed = g.p > 1 and onednn_packing(weight, plan)
    unpacked = None
    if packed:
        unpacked = SplitWeights(grouped, pointwise, channel_order, filter_order, filter_inverse)
        grouped = torch.ops.mkldnn._reorder_convolution_weight(
            grouped.detach().contiguous(memory_format=_CL), list(g.padding), list(g.stride), list(g.dilation), g.p,
            list(input_shape),
        )
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
    taps = x if direct else centre_taps(x, g.kernel_size, g.stride, g.padding, g.dilation)
    if w.packed and under_dispatch_mode():
        w = w.unpacked
    grouped_input = x if w.channel_order is None else x.index_select(1, w.channel_order)
    if w.packed:
        if w.filter_order is not None:
            grouped_input = grouped_input.contiguous(memory_format=_CL)
            if bias is not None:
                bias = bias.index_select(0, w.filter_order)
        acc = F.conv2d(taps.contiguous(memory_format=_CL), w.pointwise, bias)
        out = torch.ops.mkldnn._convolution_pointwise_.binary(
            acc, grouped_input, w.grouped, None, list(g.padding), list(g.stride), list(g.dilation),
            g.p, "add", 1.0, None, [], None,
        )
        if w.filter_inverse is not None:
            out = out.index_select(1, w.filter_inverse).contiguous(memory_format=_CL)
        return out
    grouped = F.conv2d(grouped_input, w.grouped, None, g.stride, g.padding, g.dilation, g.p)
    if w.filter_inverse is not None:
        grouped = grouped.index_select(1, w.filter_inverse)
    pointwise = F.conv2d(taps, w.pointwise, bias)
    if plan.cache:
        # Eager inference: accumulate in place, one output-sized tensor less.
        out = pointwise.add_(grouped)
    else:
        out = grouped + pointwise
    if plan.channels_last and not out.is_contiguous(memory_format=_CL):
        out = out.contiguous(memory_format=_CL)
    return out
