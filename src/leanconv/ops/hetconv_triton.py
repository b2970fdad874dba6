"""The ``triton`` HetConv backend: launchers and autograd around ``kernels/hetconv.py``.

HetConv (Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120) computed
directly: one implicit-GEMM kernel per pass (forward, input gradient, weight
gradient) that accumulates the KxK taps on each filter's own channels and the
1x1 centre taps on the others in float32, with no dense weight and no
block-diagonal zero work. Cost: Ho*Wo*N*(M/P*K*K + M - M/P) MACs per image
(FLOPs = 2 x MACs), for the forward and for each of the two gradients.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the
test suite checks it without a GPU). float32 (TF32 where
``torch.backends.cudnn.allow_tf32`` allows it, as for ``F.conv2d``), bfloat16
and float16; autocast casts as it would for a convolution. This module imports
Triton at import time: ``backends.py`` imports it only where Triton is found.

Example (CUDA)::

    x = torch.randn(8, 64, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    layer = leanconv.HetConv2d(64, 64, 3, padding=1, p=4, backend="triton").cuda()
    y = layer(x)
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from ..kernels.conv_common import phase_count
from ..kernels.hetconv import hetconv_dw_kernel, hetconv_dx_kernel, hetconv_fwd_kernel
from .hetconv_layout import group_filter_order, pointwise_channel_index
from .triton_launch import (
    SUPPORTED_DTYPES,
    apply_function,
    cast_and_check,
    cdiv,
    device_unsupported,
    empty_like_format,
    int_pair,
    interpreted,
    output_size,
    strides_nhwc,
)

__all__ = ["hetconv_triton", "hetconv_triton_packed", "pack_weights", "unsupported", "SUPPORTED_DTYPES"]

BACKEND = "triton"


def unsupported(x: torch.Tensor) -> str | None:
    """None when the kernels can run on ``x``, else the reason (a sentence)."""
    return device_unsupported(x, BACKEND)


@functools.lru_cache(maxsize=256)
def _pointwise_gather(in_channels: int, out_channels: int, p: int, layout: str) -> torch.Tensor | None:
    """(N, M - Mg) table: row n' (group-ordered filter), column k -> position in
    ``pointwise_weight[real filter]`` of group g's k-th other channel in group
    order. None for the blocked layout, where it is the identity."""
    if layout == "blocked":
        return None
    mg, ng = in_channels // p, out_channels // p
    index = pointwise_channel_index(in_channels, out_channels, p, layout)
    order = group_filter_order(in_channels, out_channels, p, layout)
    rows = []
    for n_group_ordered in range(out_channels):
        g = n_group_ordered // ng
        position = {int(c): k for k, c in enumerate(index[int(order[n_group_ordered])])}
        row = []
        for k in range(in_channels - mg):
            cg = k if k < g * mg else k + mg
            real = (cg % mg) * p + cg // mg  # shifted: channel i of group h is h + P*i
            row.append(position[real])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def pack_weights(
    weight: torch.Tensor, pointwise_weight: torch.Tensor, p: int, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' weight layout (differentiable torch ops; see ``kernels/hetconv.py``).

    Returns ``wk`` (P*KH*KW*Mg, Ng) and ``wp`` (P*(M-Mg), Ng)."""
    out_channels, mg, kh, kw = weight.shape
    in_channels, ng = mg * p, out_channels // p
    if layout == "shifted":
        order = group_filter_order(in_channels, out_channels, p, layout, weight.device)
        weight = weight.index_select(0, order)
        pointwise_weight = pointwise_weight.index_select(0, order)
        gather = _pointwise_gather(in_channels, out_channels, p, layout).to(weight.device)
        pointwise_weight = pointwise_weight.gather(1, gather)
    wk = weight.reshape(p, ng, mg, kh, kw).permute(0, 3, 4, 2, 1).reshape(p * kh * kw * mg, ng).contiguous()
    others = in_channels - mg
    wp = pointwise_weight.reshape(p, ng, others).transpose(1, 2).reshape(p * others, ng).contiguous()
    return wk, wp


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreted():
        return "tf32"
    return "ieee"


def _dw_split(rows: int, ng: int, p: int, pixels: int, device: torch.device) -> int:
    """Slices of the pixel reduction for the weight gradient: enough programs to fill the GPU."""
    if interpreted():
        return 1 if pixels <= 64 else 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = p * cdiv(rows, 64) * cdiv(ng, 64)
    split = max(1, cdiv(4 * sms, tiles))
    return max(1, min(split, cdiv(pixels, 512)))


class _HetConvTritonFunction(torch.autograd.Function):
    """y = HetConv(x; wk, wp) + bias with the packed weights; gradients by the two backward kernels."""

    @staticmethod
    def forward(ctx, x, wk, wp, bias, stride, padding, dilation, p, kernel_size, shifted):
        batch, in_channels, height, width = x.shape
        out_channels = wk.shape[1] * p
        kh, kw = kernel_size
        out_h, out_w = output_size(x, kernel_size, stride, padding, dilation, out_channels)
        y = empty_like_format((batch, out_channels, out_h, out_w), x)
        ctx.save_for_backward(x, wk, wp)
        ctx.geometry = (stride, padding, dilation, p, kernel_size, shifted, bias is not None)
        if y.numel() == 0:
            return y
        mg, ng = in_channels // p, out_channels // p

        def grid(meta):
            return (cdiv(batch * out_h * out_w, meta["BLOCK_M"]), p * cdiv(ng, meta["BLOCK_N"]))

        hetconv_fwd_kernel[grid](
            x, wk, wp, bias if bias is not None else wk, y,
            batch, height, width, out_h, out_w, in_channels, out_channels, mg, ng,
            *strides_nhwc(x), *strides_nhwc(y),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            P=p, KH=kh, KW=kw, SHIFTED=shifted, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
        )
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, wk, wp = ctx.saved_tensors
        stride, padding, dilation, p, kernel_size, shifted, has_bias = ctx.geometry
        batch, in_channels, height, width = x.shape
        out_channels = wk.shape[1] * p
        out_h, out_w = dy.shape[2], dy.shape[3]
        mg, ng = in_channels // p, out_channels // p
        kh, kw = kernel_size
        precision = _precision(x.dtype)
        geometry = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
        shape_args = (batch, height, width, out_h, out_w, in_channels, out_channels, mg, ng)
        dx = dwk = dwp = dbias = None
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        if dy.numel() == 0:
            dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
            dwk = torch.zeros_like(wk) if ctx.needs_input_grad[1] else None
            dwp = torch.zeros_like(wp) if ctx.needs_input_grad[2] else None
            dbias = dy.new_zeros(out_channels) if has_bias and ctx.needs_input_grad[3] else None
            return dx, dwk, dwp, dbias, None, None, None, None, None, None

        if ctx.needs_input_grad[0]:
            dx = empty_like_format(x.shape, x, x.dtype)

            per_phase, phases = phase_count(height, width, stride)

            def grid_dx(meta):
                return (cdiv(batch * per_phase, meta["BLOCK_M"]), p * cdiv(mg, meta["BLOCK_C"]), phases)

            hetconv_dx_kernel[grid_dx](
                dy, wk, wp, dx, *shape_args, *strides_nhwc(dy), *strides_nhwc(dx), *geometry,
                P=p, KH=kh, KW=kw, SHIFTED=shifted, PRECISION=precision,
            )

        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            kxk_rows = kh * kw * mg
            rows = kxk_rows + in_channels - mg
            pixels = batch * out_h * out_w
            split = _dw_split(rows, ng, p, pixels, x.device)
            per_split = cdiv(pixels, split)
            part = torch.empty((split, p, rows, ng), dtype=torch.float32, device=x.device)

            def grid_dw(meta):
                if meta["ALIGNED"]:  # row tiles within one tap: KxK chunks per tap, then the pointwise rows
                    tiles = kh * kw * cdiv(mg, meta["BLOCK_R"]) + cdiv(in_channels - mg, meta["BLOCK_R"])
                else:
                    tiles = cdiv(rows, meta["BLOCK_R"])
                return (p * tiles, cdiv(ng, meta["BLOCK_N"]), split)

            hetconv_dw_kernel[grid_dw](
                x, dy, part, *shape_args, split, per_split, *strides_nhwc(x), *strides_nhwc(dy), *geometry,
                P=p, KH=kh, KW=kw, SHIFTED=shifted, PRECISION=precision,
            )
            grad = part.sum(0) if split > 1 else part[0]
            dwk = grad[:, :kxk_rows].reshape(wk.shape).to(wk.dtype)
            dwp = grad[:, kxk_rows:].reshape(wp.shape).to(wp.dtype)

        if has_bias and ctx.needs_input_grad[3]:
            dbias = dy.sum(dim=(0, 2, 3), dtype=torch.float32).to(x.dtype)
        return dx, dwk, dwp, dbias, None, None, None, None, None, None


def hetconv_triton(
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
    """HetConv of a (B, M, H, W) input (zero padding) -> (B, N, Ho, Wo) by the Triton kernels.

    The output has the input's memory format (channels_last in, channels_last out)."""
    x, weight, pointwise_weight, bias = cast_and_check(
        x, BACKEND, weight=weight, pointwise_weight=pointwise_weight, bias=bias,
    )
    if weight.dim() != 4 or weight.shape[0] % p or x.shape[1] != weight.shape[1] * p:
        raise ValueError(
            f"triton backend: weight must be (N, M/P, kh, kw) with N divisible by p={p} and M/P = "
            f"{x.shape[1]}/{p} for an input of {x.shape[1]} channels, got {tuple(weight.shape)}"
        )
    expected = (weight.shape[0], x.shape[1] - weight.shape[1])
    if tuple(pointwise_weight.shape) != expected:
        raise ValueError(f"triton backend: pointwise_weight must be (N, M - M/P) = {expected}, "
                         f"got {tuple(pointwise_weight.shape)}")
    wk, wp = pack_weights(weight, pointwise_weight, p, layout)
    return hetconv_triton_packed(x, wk, wp, bias, stride, padding, dilation, p, (weight.shape[2], weight.shape[3]), layout)


def hetconv_triton_packed(
    x: torch.Tensor,
    wk: torch.Tensor,
    wp: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    p: int,
    kernel_size: tuple[int, int],
    layout: str,
) -> torch.Tensor:
    """:func:`hetconv_triton` from weights already packed by :func:`pack_weights`
    (``HetConv2d`` packs once for inference and reuses them until the parameters change)."""
    # The packed tensors are the layer's weight and pointwise_weight, so errors name those.
    x, wk, wp, bias = cast_and_check(x, BACKEND, weight=wk, pointwise_weight=wp, bias=bias)
    channels, taps = x.shape[1], kernel_size[0] * kernel_size[1]
    if channels % p or wk.dim() != 2 or wk.shape[0] != taps * channels or wp.dim() != 2:
        raise ValueError(
            f"triton backend: packed weight must be (P*kh*kw*M/P, N/P) = ({taps * channels}, N/P) for an input "
            f"of {channels} channels, got {tuple(wk.shape)}"
        )
    if tuple(wp.shape) != (p * (channels - channels // p), wk.shape[1]):
        raise ValueError(f"triton backend: packed pointwise_weight must be ({p * (channels - channels // p)}, "
                         f"{wk.shape[1]}), got {tuple(wp.shape)}")
    if bias is not None and tuple(bias.shape) != (wk.shape[1] * p,):
        raise ValueError(f"triton backend: bias must have shape ({wk.shape[1] * p},), got {tuple(bias.shape)}")
    return apply_function(
        _HetConvTritonFunction, x, wk, wp, bias, int_pair(stride), int_pair(padding), int_pair(dilation), p,
        tuple(kernel_size), layout == "shifted",
    )
