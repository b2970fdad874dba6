"""Triton kernels for the depthwise KxK convolution: forward, input gradient,
weight gradient.

The depthwise convolution of DSC (MobileNet, https://arxiv.org/abs/1704.04861)
and of BSConv-U/S (https://arxiv.org/abs/2003.13549): ``groups == in_channels``,
output channel ``o`` reads input channel ``o // D`` (D the depth multiplier)::

    y[b, o, oh, ow] = bias[o] + sum_{kh, kw} w[o, kh*KW + kw] * x[b, o // D, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]

It has no reduction over channels, so there is no matrix product to give to
tensor cores: every kernel here is a vectorised multiply-add over a tile of
pixels x channels, memory-bound, and fast when a tile's channel loads are
contiguous (NHWC, channels_last). Cost: Ho*Wo*M*D*KH*KW MACs per image for the
forward and for each gradient (FLOPs = 2 x MACs). Accumulation is float32.

* ``depthwise_fwd_kernel``: tile = BLOCK_M output pixels x BLOCK_C output
  channels, the KH*KW taps unrolled; bias in the epilogue.
* ``depthwise_dx_kernel``: tile = BLOCK_M input pixels of one *stride phase*
  (ih % sh, iw % sw) x BLOCK_C input channels. Within a phase a tap either hits
  an output position for every pixel of the tile or for none, so a strided
  layer skips the taps that cannot contribute instead of masking them
  (:func:`leanconv.kernels.conv_common.phase_tap`).
* ``depthwise_dw_kernel``: one program per (channel tile, tap, pixel slice)
  sums x * dy over its slice of the output pixels in a (BLOCK_Q, BLOCK_C)
  float32 accumulator; the launcher adds the slices (deterministic, no atomics).

Tensors are addressed through their strides (NHWC and NCHW both work). This
module imports Triton; leanconv imports it only when the depthwise ``triton``
backend runs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .conv_common import output_pixels, phase_pixels, phase_tap, pixel_slice, tile_configs

__all__ = ["depthwise_fwd_kernel", "depthwise_dx_kernel", "depthwise_dw_kernel"]

# (BLOCK_M pixels, BLOCK_C channels, unused, warps, stages): elementwise tiles,
# few stages (there is no dot to pipeline).
_FWD_BLOCKS = [
    (64, 64, 1, 4, 2),
    (128, 32, 1, 4, 2),
    (32, 128, 1, 4, 2),
    (128, 64, 1, 8, 2),
]
_DX_BLOCKS = _FWD_BLOCKS
# (BLOCK_Q pixels, BLOCK_C channels, unused, warps, stages)
_DW_BLOCKS = [
    (64, 64, 1, 4, 2),
    (128, 32, 1, 4, 2),
    (32, 128, 1, 4, 2),
]

_SHAPE_KEY = ["B", "H", "W", "Ho", "Wo", "C", "D", "KH", "KW"]


@triton.autotune(configs=tile_configs(_FWD_BLOCKS, ("BLOCK_M", "BLOCK_C", "UNUSED")), key=_SHAPE_KEY)
@triton.jit
def depthwise_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    B, H, W, Ho, Wo, C, D,
    sxb, sxh, sxw, sxc, syb, syh, syw, syc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, UNUSED: tl.constexpr,
):
    """y[output pixel tile, output channel tile] = sum over taps of w[o, tap] * x[shifted pixel, o // D]."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    o = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok = o < C * D
    c = o // D

    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < B * Ho * Wo
    b, oh, ow = output_pixels(pix, Ho, Wo)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = x_ptr + b * sxb
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in tl.static_range(KH * KW):
        ih = ih0 + (tap // KW) * dil_h
        iw = iw0 + (tap % KW) * dil_w
        ok = pix_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_img[:, None] + (ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                     mask=ok[:, None] & o_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + o * (KH * KW) + tap, mask=o_ok, other=0.0)
        acc += xt.to(tl.float32) * wt.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + b[:, None] * syb + (oh * syh + ow * syw)[:, None] + o[None, :] * syc
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=pix_ok[:, None] & o_ok[None, :])


@triton.autotune(configs=tile_configs(_DX_BLOCKS, ("BLOCK_M", "BLOCK_C", "UNUSED")), key=_SHAPE_KEY)
@triton.jit
def depthwise_dx_kernel(
    dy_ptr, w_ptr, dx_ptr,
    B, H, W, Ho, Wo, C, D,
    sdb, sdh, sdw, sdc, sxb, sxh, sxw, sxc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, UNUSED: tl.constexpr,
):
    """dx[input pixel tile of one stride phase, channel tile] = sum over d < D and the
    contributing taps of w[c*D + d, tap] * dy[output pixel, c*D + d]."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    phase = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C

    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b, ih, iw, pix_ok = phase_pixels(pix, phase, B, H, W, stride_h, stride_w)
    dy_img = dy_ptr + b * sdb
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in tl.static_range(KH * KW):
        hits, oh, ow, ok = phase_tap(phase, ih, iw, pix_ok, tap, KH, KW, Ho, Wo,
                                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        if hits:
            base = dy_img + oh * sdh + ow * sdw
            for d in range(0, D):
                o = c * D + d
                dyt = tl.load(base[:, None] + o[None, :] * sdc, mask=ok[:, None] & c_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + o * (KH * KW) + tap, mask=c_ok, other=0.0)
                acc += dyt.to(tl.float32) * wt.to(tl.float32)[None, :]
    out = dx_ptr + b[:, None] * sxb + (ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=tile_configs(_DW_BLOCKS, ("BLOCK_Q", "BLOCK_C", "UNUSED")), key=_SHAPE_KEY + ["SPLIT"])
@triton.jit
def depthwise_dw_kernel(
    x_ptr, dy_ptr, part_ptr,
    B, H, W, Ho, Wo, C, D, SPLIT, pixels_per_split,
    sxb, sxh, sxw, sxc, sdb, sdh, sdw, sdc,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, UNUSED: tl.constexpr,
):
    """part[s, o, tap] = sum over slice s of the output pixels of x[tap-shifted pixel, o // D] * dy[pixel, o]."""
    pid_c = tl.program_id(0)
    tap = tl.program_id(1)
    s = tl.program_id(2)
    o = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok = o < C * D
    c = o // D
    kh = tap // KW
    kw = tap % KW

    start, stop = pixel_slice(s, pixels_per_split, B * Ho * Wo)
    cq = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for q0 in range(start, stop, BLOCK_Q):
        q = q0 + cq
        q_ok = q < stop
        b, oh, ow = output_pixels(q, Ho, Wo)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        ok = q_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_ptr + b[:, None] * sxb + (ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                     mask=ok[:, None] & o_ok[None, :], other=0.0)
        dyt = tl.load(dy_ptr + b[:, None] * sdb + (oh * sdh + ow * sdw)[:, None] + o[None, :] * sdc,
                      mask=q_ok[:, None] & o_ok[None, :], other=0.0)
        acc += xt.to(tl.float32) * dyt.to(tl.float32)
    total_taps = KH * KW
    out = part_ptr + (s * (C * D) + o) * total_taps + tap
    tl.store(out, tl.sum(acc, axis=0), mask=o_ok)
