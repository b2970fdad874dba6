"""The ``triton`` depthwise backend: launchers and autograd around ``kernels/depthwise.py``.

The depthwise KxK convolution (``groups == in_channels``, any depth multiplier)
of DSConv2d, BSConvU2d and BSConvS2d, computed by one Triton kernel per pass
(forward, input gradient, weight gradient). Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (how the test suite checks it without a
GPU). float32, bfloat16, float16; float32 accumulation. This module imports
Triton: ``ops/depthwise.py`` imports it only where Triton is found and the
backend is used.
"""

from __future__ import annotations

import os

import torch

from ..kernels.conv_common import phase_count
from ..kernels.depthwise import depthwise_dw_kernel, depthwise_dx_kernel, depthwise_fwd_kernel

__all__ = ["depthwise_triton", "unsupported", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported(x: torch.Tensor) -> str | None:
    """None when the kernels can run on ``x``, else the reason (a sentence)."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreted()):
        return f"the triton depthwise backend needs a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got {x.device}"
    if x.dtype not in SUPPORTED_DTYPES and not (torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32):
        return f"the triton depthwise backend supports {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}"
    if x.dim() != 4:
        return f"the triton depthwise backend takes a 4-D (B, C, H, W) input, got {x.dim()}-D"
    if x.shape[1] * x.shape[2] * x.shape[3] >= 2**31:
        return "one image has 2**31 elements or more (the kernels index within an image in int32)"
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides_nhwc(t: torch.Tensor) -> tuple[int, int, int, int]:
    sb, sc, sh, sw = t.stride()
    return sb, sh, sw, sc


def _empty_like_format(shape, like: torch.Tensor) -> torch.Tensor:
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _dw_split(channel_tiles: int, taps: int, pixels: int, device: torch.device) -> int:
    """Slices of the pixel reduction of the weight gradient: enough programs to fill the GPU."""
    if _interpreted():
        return 1 if pixels <= 64 else 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = max(1, _cdiv(4 * sms, channel_tiles * taps))
    return max(1, min(split, _cdiv(pixels, 1024)))


class _DepthwiseTritonFunction(torch.autograd.Function):
    """y = depthwise(x; w) + bias, w as (C*D, KH*KW); gradients by the two backward kernels."""

    @staticmethod
    def forward(ctx, x, w, bias, stride, padding, dilation, multiplier, kernel_size):
        batch, channels, height, width = x.shape
        kh, kw = kernel_size
        out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        y = _empty_like_format((batch, channels * multiplier, max(out_h, 0), max(out_w, 0)), x)
        ctx.save_for_backward(x, w)
        ctx.geometry = (stride, padding, dilation, multiplier, kernel_size, bias is not None)
        if y.numel() == 0:
            return y

        def grid(meta):
            return (_cdiv(batch * out_h * out_w, meta["BLOCK_M"]), _cdiv(channels * multiplier, meta["BLOCK_C"]))

        depthwise_fwd_kernel[grid](
            x, w, bias if bias is not None else w, y,
            batch, height, width, out_h, out_w, channels, multiplier,
            *_strides_nhwc(x), *_strides_nhwc(y),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, HAS_BIAS=bias is not None,
        )
        return y

    @staticmethod
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
            dx = _empty_like_format(x.shape, x)
            per_phase, phases = phase_count(height, width, stride)

            def grid_dx(meta):
                return (_cdiv(batch * per_phase, meta["BLOCK_M"]), _cdiv(channels, meta["BLOCK_C"]), phases)

            depthwise_dx_kernel[grid_dx](
                dy, w, dx, *shape_args, *_strides_nhwc(dy), *_strides_nhwc(dx), *geometry, KH=kh, KW=kw,
            )

        if ctx.needs_input_grad[1]:
            outputs, taps, pixels = channels * multiplier, kh * kw, batch * out_h * out_w
            split = _dw_split(_cdiv(outputs, 64), taps, pixels, x.device)
            per_split = _cdiv(pixels, split)
            part = torch.empty((split, outputs, taps), dtype=torch.float32, device=x.device)

            def grid_dw(meta):
                return (_cdiv(outputs, meta["BLOCK_C"]), taps, split)

            depthwise_dw_kernel[grid_dw](
                x, dy, part, *shape_args, split, per_split, *_strides_nhwc(x), *_strides_nhwc(dy), *geometry,
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
    reason = unsupported(x)
    if reason is not None:
        raise ValueError(reason)
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] % channels:
        raise ValueError(
            f"depthwise weight must be (C*D, 1, KH, KW) for an input of C={channels} channels, "
            f"got {tuple(weight.shape)}"
        )
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"triton depthwise backend: input is {x.dtype} but {name} is {tensor.dtype}")
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"triton depthwise backend: input is on {x.device} but {name} is on {tensor.device}")
    kernel_size = (weight.shape[2], weight.shape[3])
    w = weight.reshape(weight.shape[0], kernel_size[0] * kernel_size[1])
    return _apply(
        _DepthwiseTritonFunction, x, w.contiguous(), bias, tuple(stride), tuple(padding), tuple(dilation),
        weight.shape[0] // channels, kernel_size,
    )


@torch.compiler.disable
def _interpreted_apply(function, *args):
    return function.apply(*args)


def _apply(function, *args):
    """``function.apply(*args)``; under ``TRITON_INTERPRET=1`` outside of torch.compile's
    graph (TorchDynamo would trace into the interpreter's Python; on a GPU it
    captures the Triton kernels themselves)."""
    if _interpreted():
        return _interpreted_apply(function, *args)
    return function.apply(*args)
