"""The ``triton`` depthwise backend: launchers and autograd around ``kernels/depthwise.py``.

The depthwise KxK convolution (``groups == in_channels``, any depth multiplier)
of DSConv2d, BSConvU2d and BSConvS2d, computed by one Triton kernel per pass
(forward, input gradient, weight gradient). Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (how the test suite checks it without a
GPU). float32, bfloat16, float16; float32 accumulation. This module imports
Triton: ``ops/backends.py`` imports it only where Triton is found and the
backend is used.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels.conv_common import phase_count
from ..kernels.depthwise import depthwise_dw_kernel, depthwise_dx_kernel, depthwise_fwd_kernel
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

__all__ = ["depthwise_triton", "unsupported", "SUPPORTED_DTYPES"]

BACKEND = "triton depthwise"


def unsupported(x: torch.Tensor) -> str | None:
    """None when the kernels can run on ``x``, else the reason (a sentence)."""
    return device_unsupported(x, BACKEND)


def _dw_split(channel_tiles: int, taps: int, pixels: int, device: torch.device) -> int:
    """Slices of the pixel reduction of the weight gradient: enough programs to fill the GPU."""
    if interpreted():
        return 1 if pixels <= 64 else 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = max(1, cdiv(4 * sms, channel_tiles * taps))
    return max(1, min(split, cdiv(pixels, 1024)))


class _DepthwiseTritonFunction(torch.autograd.Function):
    """y = depthwise(x; w) + bias, w as (C*D, KH*KW); gradients by the two backward kernels."""

    @staticmethod
    def forward(ctx, x, w, bias, stride, padding, dilation, multiplier, kernel_size):
        batch, channels, height, width = x.shape
        kh, kw = kernel_size
        out_h, out_w = output_size(x, kernel_size, stride, padding, dilation, channels * multiplier)
        y = empty_like_format((batch, channels * multiplier, out_h, out_w), x)
        ctx.save_for_backward(x, w)
        ctx.geometry = (stride, padding, dilation, multiplier, kernel_size, bias is not None)
        if y.numel() == 0:
            return y

        def grid(meta):
            return (cdiv(batch * out_h * out_w, meta["BLOCK_M"]), cdiv(channels * multiplier, meta["BLOCK_C"]))

        depthwise_fwd_kernel[grid](
            x, w, bias if bias is not None else w, y,
            batch, height, width, out_h, out_w, channels, multiplier,
            *strides_nhwc(x), *strides_nhwc(y),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, HAS_BIAS=bias is not None,
        )
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        stride, padding, dilation, multiplier, (kh, kw), has_bias = ctx.geometry
        batch, channels, height, width = x.shape
        out_h, out_w = dy.shape[2], dy.shape[3]
        geometry = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
        shape_args = (batch, height, width, out_h, out_w, channels, multiplier)
        dx = dw = dbias = None
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        if dy.numel() == 0:
            dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
            dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
            dbias = w.new_zeros(w.shape[0]) if has_bias and ctx.needs_input_grad[2] else None
            return dx, dw, dbias, None, None, None, None, None

        if ctx.needs_input_grad[0]:
            dx = empty_like_format(x.shape, x)
            per_phase, phases = phase_count(height, width, stride)

            def grid_dx(meta):
                return (cdiv(batch * per_phase, meta["BLOCK_M"]), cdiv(channels, meta["BLOCK_C"]), phases)

            depthwise_dx_kernel[grid_dx](
                dy, w, dx, *shape_args, *strides_nhwc(dy), *strides_nhwc(dx), *geometry, KH=kh, KW=kw,
            )

        if ctx.needs_input_grad[1]:
            outputs, taps, pixels = channels * multiplier, kh * kw, batch * out_h * out_w
            split = _dw_split(cdiv(outputs, 64), taps, pixels, x.device)
            per_split = cdiv(pixels, split)
            part = torch.empty((split, outputs, taps), dtype=torch.float32, device=x.device)

            def grid_dw(meta):
                return (cdiv(outputs, meta["BLOCK_C"]), taps, split)

            depthwise_dw_kernel[grid_dw](
                x, dy, part, *shape_args, split, per_split, *strides_nhwc(x), *strides_nhwc(dy), *geometry,
                KH=kh, KW=kw,
            )
            dw = (part.sum(0) if split > 1 else part[0]).to(w.dtype)

        if has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(dim=(0, 2, 3), dtype=torch.float32).to(x.dtype)
        return dx, dw, dbias, None, None, None, None, None


def depthwise_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Depthwise convolution of a (B, C, H, W) input with a (C*D, 1, KH, KW) weight
    (zero padding ``padding`` on each side) -> (B, C*D, Ho, Wo), by the Triton kernels.

    Equals ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``; the
    output has the input's memory format."""
    x, weight, bias = cast_and_check(x, BACKEND, weight=weight, bias=bias)
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1 or channels == 0 or weight.shape[0] % channels:
        raise ValueError(
            f"depthwise weight must be (C*D, 1, KH, KW) for an input of C={channels} channels, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"depthwise bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    kernel_size = (weight.shape[2], weight.shape[3])
    w = weight.reshape(weight.shape[0], kernel_size[0] * kernel_size[1])
    return apply_function(
        _DepthwiseTritonFunction, x, w, bias, int_pair(stride), int_pair(padding), int_pair(dilation),
        weight.shape[0] // channels, kernel_size,
    )
