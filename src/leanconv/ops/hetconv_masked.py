"""HetConv as the public seed computation made exact: a grouped KxK convolution
plus a dense 1x1 convolution whose weight is zero on each filter's own KxK channels.

HetConv (Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for
Deep CNNs", CVPR 2019, https://arxiv.org/abs/1903.04120).

The public HetConv code computes ``conv(x, W_g, groups=P) + conv(x, W_1)`` with
a free (N, M, 1, 1) weight ``W_1``; with ``W_1`` zero on the block diagonal
(each filter's own KxK channels) that sum *is* HetConv. This backend runs exactly
those two oneDNN convolutions, with ``W_1`` materialised from
``pointwise_weight`` (:func:`masked_pointwise_weight`):

* inference: ``W_1`` and the grouped weight are built once and cached by the
  layer (:meth:`leanconv.HetConv2d.prepared_weights`, kind ``"masked"``); on
  channels-last float32/bfloat16 CPU inputs the grouped weight is packed for
  oneDNN and the grouped convolution adds itself onto the 1x1 result as a
  post-op, elsewhere the 1x1 result is added into the grouped output in place;
* training: :class:`_GroupedPlusMaskedPointwise` runs both convolutions and one
  in-place add, and in backward two ``convolution_backward`` calls whose input
  gradients are accumulated in place; ``W_1`` is built differentiably from
  ``pointwise_weight`` (a few pads and reshapes), so its gradient is the
  off-block entries of the dense 1x1 weight gradient.

It differs from :mod:`.hetconv_split` (same arithmetic through plain autograd)
by the cached inference weights and the in-place accumulation (one output-sized
tensor less forward and backward), and from :mod:`.hetconv_fused` by running
the 1x1 part as a oneDNN convolution instead of a GEMM over the rows view.

Cost: Ho*Wo*N*(M/P*K*K + M) MACs per image: HetConv's count plus the N*M/P
zero products of the block diagonal (8% above HetConv at P = 4, K = 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .conv_geometry import centre_taps
from .hetconv_fused import pointwise_matrix
from .hetconv_layout import group_channel_order, group_filter_order

__all__ = ["MaskedWeights", "hetconv_masked", "hetconv_masked_prepared", "masked_pointwise_weight", "prepare_masked"]

_CL = torch.channels_last


def masked_pointwise_weight(pointwise_weight: torch.Tensor, in_channels: int, p: int, layout: str) -> torch.Tensor:
    """(N, M, 1, 1) dense 1x1 weight: ``pointwise_weight`` on each filter's other
    channels, zero on its KxK channels. Differentiable."""
    return pointwise_matrix(pointwise_weight, in_channels, p, layout)[:, :, None, None]


def _reads_input_directly(kernel_size, stride, padding, dilation) -> bool:
    centre = (dilation[0] * (kernel_size[0] - 1) // 2, dilation[1] * (kernel_size[1] - 1) // 2)
    return tuple(stride) == (1, 1) and tuple(padding) == centre


@dataclass
class MaskedWeights:
    """Weight-derived tensors of one layer for the masked form.

    ``grouped``: (N, M/P, kh, kw) KxK weights in group order; ``pointwise``:
    (N, M, 1, 1) masked 1x1 weight (rows in group order, columns natural);
    ``channel_order``/``filter_order``/``filter_inverse``: gathers for the
    shifted layout (None for blocked).
    """

    grouped: torch.Tensor
    pointwise: torch.Tensor
    channel_order: torch.Tensor | None
    filter_order: torch.Tensor | None
    filter_inverse: torch.Tensor | None
    groups: int
    packed: bool = False


def prepare_masked(
    weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    p: int,
    layout: str,
    *,
    packed: bool = False,
    padding=(0, 0),
    stride=(1, 1),
    dilation=(1, 1),
    input_size=None,
) -> MaskedWeights:
    """Build the tensors :func:`hetconv_masked_prepared` needs (differentiable
    unless ``packed``; a layer caches the result for calls without autograd).

    ``packed`` (CPU inference on channels-last float32/bfloat16 inputs): the
    grouped weight is reordered once into oneDNN's blocked format and the grouped
    convolution adds itself onto the 1x1 result as oneDNN's ``add`` post-op, so
    the sum costs no extra pass over the output.
    """
    out_channels, per_group = weight.shape[:2]
    in_channels = per_group * p
    pointwise = masked_pointwise_weight(pointwise_weight, in_channels, p, layout)
    grouped = weight
    channel_order = filter_order = filter_inverse = None
    if layout == "shifted" and p > 1:
        channel_order = group_channel_order(in_channels, out_channels, p, layout, weight.device)
        filter_order = group_filter_order(in_channels, out_channels, p, layout, weight.device)
        filter_inverse = torch.argsort(filter_order)
        grouped = weight.index_select(0, filter_order)
        pointwise = pointwise.index_select(0, filter_order)
    if packed:
        grouped = torch.ops.mkldnn._reorder_convolution_weight(
            grouped.detach().contiguous(memory_format=_CL), list(padding), list(stride), list(dilation), p,
            None if input_size is None else list(input_size),
        )
        pointwise = pointwise.detach().contiguous(memory_format=_CL)
    return MaskedWeights(grouped, pointwise, channel_order, filter_order, filter_inverse, p, packed)


class _GroupedPlusMaskedPointwise(torch.autograd.Function):
    """out = conv2d(x, grouped, bias, groups=P) + conv2d(taps, pointwise), the
    sum taken in place; ``taps`` is None when it is ``x`` itself (stride 1,
    centred padding). First derivatives only (use ``split`` or ``reference`` for
    higher-order gradients)."""

    @staticmethod
    def forward(ctx, x, taps, grouped, pointwise, bias, stride, padding, dilation, groups):
        out = F.conv2d(x, grouped, bias, stride, padding, dilation, groups)
        out.add_(F.conv2d(x if taps is None else taps, pointwise))
        ctx.save_for_backward(x, taps, grouped, pointwise)
        ctx.geometry = (stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, taps, grouped, pointwise = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.geometry
        needs = ctx.needs_input_grad
        if not (grad_out.is_contiguous() or grad_out.is_contiguous(memory_format=_CL)):
            channels_last = x.is_contiguous(memory_format=_CL) and not x.is_contiguous()
            grad_out = grad_out.contiguous(memory_format=_CL if channels_last else torch.contiguous_format)
        source = x if taps is None else taps
        want_source = needs[0] if taps is None else needs[1]
        grad_x, grad_grouped, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x, grouped, [grouped.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [needs[0], needs[2], has_bias and needs[4]],
        )
        grad_source, grad_pointwise, _ = torch.ops.aten.convolution_backward(
            grad_out, source, pointwise, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [want_source, needs[3], False],
        )
        grad_taps = None
        if taps is None:
            if grad_x is not None and grad_source is not None:
                grad_x.add_(grad_source)
        else:
            grad_taps = grad_source
        return grad_x, grad_taps, grad_grouped, grad_pointwise, grad_bias, None, None, None, None


def hetconv_masked_prepared(
    x: torch.Tensor,
    prepared: MaskedWeights,
    bias: torch.Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """HetConv of a (B, M, H, W) input (zero padding) with prepared weights."""
    direct = _reads_input_directly(kernel_size, stride, padding, dilation)
    taps = None if direct else centre_taps(x, kernel_size, stride, padding, dilation)
    grouped_input = x
    # The output keeps the input's memory format, as nn.Conv2d's does (index_select drops channels-last).
    channels_last = x.is_contiguous(memory_format=_CL) and not x.is_contiguous()
    if prepared.channel_order is not None:
        grouped_input = x.index_select(1, prepared.channel_order)
        if channels_last:
            grouped_input = grouped_input.contiguous(memory_format=_CL)
        if taps is None:
            taps = x
        if bias is not None:
            bias = bias.index_select(0, prepared.filter_order)
    if prepared.packed:
        if not channels_last:
            raise ValueError("packed masked weights need a channels-last input (oneDNN's add post-op)")
        acc = F.conv2d(grouped_input if taps is None else taps.contiguous(memory_format=_CL), prepared.pointwise, bias)
        out = torch.ops.mkldnn._convolution_pointwise_.binary(
            acc, grouped_input, prepared.grouped, None, list(padding), list(stride), list(dilation),
            prepared.groups, "add", 1.0, None, [], None,
        )
    elif not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, prepared.grouped, prepared.pointwise, bias)
    ):
        out = F.conv2d(grouped_input, prepared.grouped, bias, stride, padding, dilation, prepared.groups)
        out.add_(F.conv2d(grouped_input if taps is None else taps, prepared.pointwise))
    else:
        out = _GroupedPlusMaskedPointwise.apply(
            grouped_input, taps, prepared.grouped, prepared.pointwise, bias, stride, padding, dilation, prepared.groups
        )
    if prepared.filter_inverse is not None:
        out = out.index_select(1, prepared.filter_inverse)
        if channels_last:
            out = out.contiguous(memory_format=_CL)
    return out


def hetconv_masked(
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
    """The backend: builds the masked weights on every call (a layer caches them
    for inference, see :meth:`leanconv.HetConv2d.prepared_weights`)."""
    if p == 1:
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    prepared = prepare_masked(weight, pointwise_weight, p, layout)
    return hetconv_masked_prepared(x, prepared, bias, (weight.shape[2], weight.shape[3]), stride, padding, dilation)
