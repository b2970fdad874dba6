"""HetConv as a grouped KxK convolution with the 1x1 part added in place by one GEMM.

HetConv (Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for
Deep CNNs", CVPR 2019, https://arxiv.org/abs/1903.04120).

The split form (:mod:`.hetconv_split`) runs two convolutions and a third pass
to add their outputs. Here the input is taken in channels-last order, where a
(B, C, H, W) tensor is a (B*H*W, C) matrix without a copy, so the 1x1 part is a
single matrix product ``taps (B*Ho*Wo, M) @ A^T (M, N)`` accumulated straight
into the grouped convolution's output with ``addmm_`` (beta = 1): no second
output tensor and no separate add. ``A`` is the (N, M) pointwise matrix with
zeros on each filter's own KxK channels (the block diagonal in the blocked
layout), so the sum is exactly HetConv.

Backward (:class:`_GroupedPlusPointwise`) mirrors it: one
``convolution_backward`` for the grouped part, and the 1x1 part's input
gradient accumulated into the convolution's input gradient by ``addmm_``.

Cost: Ho*Wo*N*(M/P*K*K + M) MACs per image, like the split form (HetConv's
count plus the N*M/P zero products of the block diagonal; at P = 4, K = 3 that
is 8% above HetConv's own count).

Two entry points:

* :func:`hetconv_fused` -- the backend: any dtype and memory format, autograd.
  The output has the input's memory format (an NCHW input is converted to
  channels-last and back, which costs two passes over memory: prefer
  channels-last models, ``model.to(memory_format=torch.channels_last)``).
* :func:`prepare_fused` + :func:`hetconv_fused_prepared` -- the same with the
  weight-derived tensors built once (the layer caches them, see
  :meth:`leanconv.HetConv2d.prepared_weights`); with ``packed=True`` the
  grouped weight is reordered once into oneDNN's blocked format and the
  convolution adds itself onto the GEMM result with oneDNN's ``add`` post-op
  (inference only: no autograd through the packed weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .conv_geometry import centre_taps
from .hetconv_layout import group_channel_order, group_filter_order, materialize_pointwise_matrix

__all__ = [
    "FusedWeights",
    "hetconv_fused",
    "hetconv_fused_prepared",
    "hetconv_packed",
    "prepare_fused",
    "packing_supported",
    "pointwise_matrix",
]

_CL = torch.channels_last


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (B, C, H, W) tensor as its (B*H*W, C) matrix (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _is_rows_view(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=_CL)


def _reads_input_directly(kernel_size, stride, padding, dilation) -> bool:
    """True when the centre taps of the windows are the input itself (stride 1,
    'same' padding): then the 1x1 part reads ``x`` without a gather."""
    centre = (dilation[0] * (kernel_size[0] - 1) // 2, dilation[1] * (kernel_size[1] - 1) // 2)
    return tuple(stride) == (1, 1) and tuple(padding) == centre


@dataclass
class FusedWeights:
    """Weight-derived tensors of one layer for the fused form.

    ``grouped``: (N, M/P, kh, kw) KxK weights in group order (or oneDNN's packed
    tensor when ``packed``); ``matrix_t``: (M, N) transposed pointwise matrix
    (rows: input channels in natural order, columns: filters in group order);
    ``channel_order``/``filter_order``/``filter_inverse``: gathers for the
    shifted layout (None for blocked).
    """

    grouped: torch.Tensor
    matrix_t: torch.Tensor
    channel_order: torch.Tensor | None
    filter_order: torch.Tensor | None
    filter_inverse: torch.Tensor | None
    groups: int
    packed: bool = False


def pointwise_matrix(pointwise_weight: torch.Tensor, in_channels: int, p: int, layout: str) -> torch.Tensor:
    """(N, M) pointwise matrix, zero on each filter's own KxK channels.

    Same values as :func:`.hetconv_layout.materialize_pointwise_matrix`; for the
    blocked layout built by padding and reshaping instead of an indexed write,
    which is 2-3x faster forward + backward at 256+ channels (it is rebuilt on
    every training step). The (P, P-1) grid of Mg-wide column blocks becomes a
    (P, P) grid with zero diagonal: flatten, view as (P-1, P), append a zero
    block to each row, flatten, prepend one zero block, view as (P, P).
    """
    if layout != "blocked" or p == 1:
        return materialize_pointwise_matrix(pointwise_weight, in_channels, p, layout)
    out_channels = pointwise_weight.shape[0]
    per_group, filters_per_group = in_channels // p, out_channels // p
    blocks = pointwise_weight.reshape(p, filters_per_group, p - 1, per_group).transpose(0, 1)
    blocks = F.pad(blocks.reshape(filters_per_group, p - 1, p, per_group), (0, 0, 0, 1))
    blocks = F.pad(blocks.reshape(filters_per_group, (p - 1) * (p + 1), per_group), (0, 0, 1, 0))
    return blocks.reshape(filters_per_group, p, p, per_group).transpose(0, 1).reshape(out_channels, in_channels)


def packing_supported(x: torch.Tensor) -> bool:
    """oneDNN weight packing and post-op fusion: CPU, float32/bfloat16, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def prepare_fused(
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
) -> FusedWeights:
    """Build the tensors :func:`hetconv_fused_prepared` needs from the parameters.

    Differentiable (when ``packed`` is False): used under autograd it must be
    rebuilt every forward; without autograd a layer caches it until the
    parameters change.
    """
    out_channels, per_group = weight.shape[:2]
    in_channels = per_group * p
    matrix = pointwise_matrix(pointwise_weight, in_channels, p, layout)
    channel_order = filter_order = filter_inverse = None
    grouped = weight
    if layout == "shifted" and p > 1:
        channel_order = group_channel_order(in_channels, out_channels, p, layout, weight.device)
        filter_order = group_filter_order(in_channels, out_channels, p, layout, weight.device)
        filter_inverse = torch.argsort(filter_order)
        grouped = weight.index_select(0, filter_order)
        matrix = matrix.index_select(0, filter_order)
    if packed:
        grouped = torch.ops.mkldnn._reorder_convolution_weight(
            grouped.detach().contiguous(memory_format=_CL),
            list(padding), list(stride), list(dilation), p,
            None if input_size is None else list(input_size),
        )
        matrix = matrix.detach()
    return FusedWeights(grouped, matrix.t(), channel_order, filter_order, filter_inverse, p, packed)


class _GroupedPlusPointwise(torch.autograd.Function):
    """out = conv2d(x, grouped, bias, groups=P) + taps @ matrix_t, in place.

    ``x``, ``taps`` channels-last; ``taps`` is None when it is ``x`` itself.
    First derivatives only (double backward raises): use ``split`` or
    ``reference`` for higher-order gradients.
    """

    @staticmethod
    def forward(ctx, x, taps, grouped, matrix_t, bias, stride, padding, dilation, groups):
        out = F.conv2d(x, grouped, bias, stride, padding, dilation, groups)
        source = x if taps is None else taps
        if not _is_rows_view(out):
            out = out.contiguous(memory_format=_CL)
        _rows(out).addmm_(_rows(source), matrix_t)
        ctx.save_for_backward(x, taps, grouped, matrix_t)
        ctx.geometry = (stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, taps, grouped, matrix_t = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.geometry
        grad_out = grad_out.contiguous(memory_format=_CL)
        needs = ctx.needs_input_grad
        want_x = needs[0]
        grad_x, grad_grouped, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x, grouped, [grouped.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [want_x, needs[2], has_bias and needs[4]],
        )
        grad_rows = _rows(grad_out)
        source = x if taps is None else taps
        grad_taps = grad_matrix_t = None
        if needs[3]:
            grad_matrix_t = _rows(source).t().mm(grad_rows)
        if taps is None:
            if want_x:
                if not _is_rows_view(grad_x):
                    grad_x = grad_x.contiguous(memory_format=_CL)
                _rows(grad_x).addmm_(grad_rows, matrix_t.t())
        elif needs[1]:
            grad_taps = grad_rows.mm(matrix_t.t()).view(
                taps.shape[0], taps.shape[2], taps.shape[3], taps.shape[1]
            ).permute(0, 3, 1, 2)
        return grad_x, grad_taps, grad_grouped, grad_matrix_t, grad_bias, None, None, None, None


def hetconv_fused_prepared(
    x: torch.Tensor,
    prepared: FusedWeights,
    bias: torch.Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """HetConv of a (B, M, H, W) input (zero padding) with prepared weights."""
    # The output keeps the input's memory format, as nn.Conv2d's does.
    out_format = _CL if x.is_contiguous(memory_format=_CL) and not x.is_contiguous() else torch.contiguous_format
    x_cl = x.contiguous(memory_format=_CL)
    direct = _reads_input_directly(kernel_size, stride, padding, dilation)
    taps = None if direct else centre_taps(x_cl, kernel_size, stride, padding, dilation).contiguous(memory_format=_CL)
    grouped_input = x_cl
    if prepared.channel_order is not None:
        grouped_input = x_cl.index_select(1, prepared.channel_order).contiguous(memory_format=_CL)
        if taps is None:
            taps = x_cl
        if bias is not None:
            bias = bias.index_select(0, prepared.filter_order)
    if prepared.packed:
        source = grouped_input if taps is None else taps
        rows = _rows(source)
        acc = torch.addmm(bias, rows, prepared.matrix_t) if bias is not None else rows.mm(prepared.matrix_t)
        out_h, out_w = (source.shape[2], source.shape[3])
        acc = acc.view(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)
        out = torch.ops.mkldnn._convolution_pointwise_.binary(
            acc, grouped_input, prepared.grouped, None, list(padding), list(stride), list(dilation),
            prepared.groups, "add", 1.0, None, [], None,
        )
    elif not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, prepared.grouped, prepared.matrix_t, bias)
    ):
        out = F.conv2d(grouped_input, prepared.grouped, bias, stride, padding, dilation, prepared.groups)
        if not _is_rows_view(out):
            out = out.contiguous(memory_format=_CL)
        _rows(out).addmm_(_rows(grouped_input if taps is None else taps), prepared.matrix_t)
    else:
        out = _GroupedPlusPointwise.apply(
            grouped_input, taps, prepared.grouped, prepared.matrix_t, bias, stride, padding, dilation, prepared.groups
        )
    if prepared.filter_inverse is not None:
        out = out.index_select(1, prepared.filter_inverse)
    return out.contiguous(memory_format=out_format)


def hetconv_fused(
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
    """The backend: builds the weight-derived tensors on every call (a layer
    caches them instead, see :meth:`leanconv.HetConv2d.prepared_weights`)."""
    kernel_size = (weight.shape[2], weight.shape[3])
    if p == 1:
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    prepared = prepare_fused(weight, pointwise_weight, p, layout)
    return hetconv_fused_prepared(x, prepared, bias, kernel_size, stride, padding, dilation)


def hetconv_packed(
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
    """The fused form with oneDNN-packed grouped weights and the add fused into
    the convolution (float32/bfloat16 CPU inference). Where autograd must run,
    or oneDNN cannot, it is :func:`hetconv_fused`. Called bare it packs on every
    call; :class:`leanconv.HetConv2d` packs once and caches."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, pointwise_weight, bias)
    )
    if p == 1 or needs_grad or not packing_supported(x) or weight.dtype != x.dtype:
        return hetconv_fused(x, weight, pointwise_weight, bias, stride, padding, dilation, p, layout)
    prepared = prepare_fused(
        weight, pointwise_weight, p, layout, packed=True, padding=padding, stride=stride, dilation=dilation,
        input_size=tuple(x.shape),
    )
    return hetconv_fused_prepared(x, prepared, bias, (weight.shape[2], weight.shape[3]), stride, padding, dilation)
