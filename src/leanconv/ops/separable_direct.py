"""The direct separable kernels: DSC (a depthwise KxK convolution then a 1x1), BSConv-U (a
1x1 then a depthwise KxK) and BSConv-S (two 1x1s, then a depthwise KxK) in one call on the
CPU, for inference
(:file:`leanconv/kernels/separable_direct.h`, in the same C++ extension as the direct
HetConv kernel, compiled per ISA the same way).

DSC: Howard et al., "MobileNets", 2017, https://arxiv.org/abs/1704.04861.
BSConv: Haase & Amthor, CVPR 2020, https://arxiv.org/abs/2003.13549.

:func:`pack` lays the weights out for one ISA's vector width; :func:`run` calls the kernel
(the registered op ``torch.ops.leanconv.separable_direct_packed``); :func:`reference` is the
same function as the two convolutions, what the tests compare the kernel with.
:func:`why_not` and :func:`pays` say where the kernel does not apply or does not pay; the
layers (:class:`leanconv.DSConv2d`, :class:`leanconv.BSConvU2d`, :class:`leanconv.BSConvS2d`) run their
library form there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import hetconv_direct
from .registry import watched

__all__ = ["DIRECT_MAX_BATCH", "DIRECT_MAX_BATCH_NCHW", "DIRECT_MAX_PIXELS", "PackedSeparable", "pack", "pays", "run", "reference", "why_not"]


@dataclass(frozen=True)
class PackedSeparable:
    """A layer's weights laid out for the kernel of ``isa``: ``depthwise`` (taps, D rounded
    to vectors), ``pointwise`` (tiles, M, tile width), the biases (tiles * tile width), and
    the order of the two convolutions."""

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    pointwise_bias: torch.Tensor
    depthwise_bias: torch.Tensor
    out_channels: int
    pointwise_first: bool
    isa: str
    first_pointwise: torch.Tensor | None = None  # BSConv-S's first 1x1, (tiles, M, tile width)
    first_pointwise_bias: torch.Tensor | None = None


def _pointwise_tiles(weight: torch.Tensor, bias: torch.Tensor | None, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 convolution's (N, K, 1, 1) weight as (tiles, K, tile width) for ``isa``, zero beyond N,
    and its bias (tiles * tile width; zeros without one), float64 for the caller to add to."""
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    tile = hetconv_direct.tile_width(out_channels, isa)
    tiles = -(-out_channels // tile)
    padded = torch.zeros(tiles * tile, in_channels, dtype=torch.float32)
    padded[:out_channels] = weight.detach().float().reshape(out_channels, in_channels)
    padded_bias = torch.zeros(tiles * tile, dtype=torch.float64)
    if bias is not None:
        padded_bias[:out_channels] = bias.detach().double()
    return padded.reshape(tiles, tile, in_channels).transpose(1, 2).contiguous(), padded_bias


def pack(depthwise_weight: torch.Tensor, depthwise_bias: torch.Tensor | None, pointwise_weight: torch.Tensor,
         pointwise_bias: torch.Tensor | None, isa: str | None = None, *, pointwise_first: bool = False,
         first_pointwise: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> PackedSeparable:
    """Lay out ``depthwise_weight`` (D, 1, KH, KW), ``pointwise_weight`` (N, M, 1, 1) and their
    biases for ``isa``'s kernel (default: the active ISA). Depthwise first (DSC): D = M, and
    the depthwise bias folds into the pointwise one; pointwise first (BSConv-U): D = N;
    ``first_pointwise`` (weight (M', M, 1, 1), bias), BSConv-S: a 1x1 before the pointwise one."""
    isa = isa or hetconv_direct.active_isa()
    lanes = hetconv_direct.lanes(isa)
    depth, taps = depthwise_weight.shape[0], depthwise_weight.shape[2] * depthwise_weight.shape[3]
    out_channels = pointwise_weight.shape[0]
    with torch.no_grad():
        depthwise = torch.zeros(taps, -(-depth // lanes) * lanes, dtype=torch.float32)
        depthwise[:, :depth] = depthwise_weight.detach().float().reshape(depth, taps).t()
        pointwise, first_bias = _pointwise_tiles(pointwise_weight, pointwise_bias, isa)
        second_bias = torch.zeros_like(first_bias)
        if depthwise_bias is not None:
            if pointwise_first:
                second_bias[:out_channels] += depthwise_bias.detach().double()
            else:
                matrix = pointwise_weight.detach().double().reshape(out_channels, -1)
                first_bias[:out_channels] += matrix @ depthwise_bias.detach().double()
        before = before_bias = None
        if first_pointwise is not None:
            before, before_bias = _pointwise_tiles(*first_pointwise, isa)
            before_bias = before_bias.float()
    return PackedSeparable(depthwise.contiguous(), pointwise, first_bias.float(), second_bias.float(), out_channels,
                           pointwise_first, isa, before, before_bias)


def run(x: torch.Tensor, packed: PackedSeparable, kernel_size, stride, padding, dilation,
        relu: bool = False) -> torch.Tensor:
    """The layer on ``x`` (B, M, H, W) by the kernel; the output has ``x``'s memory format."""
    return torch.ops.leanconv.separable_direct_packed(
        x, packed.depthwise, packed.pointwise, packed.pointwise_bias, packed.depthwise_bias, packed.first_pointwise,
        packed.first_pointwise_bias, packed.out_channels, list(kernel_size), list(stride), list(padding),
        list(dilation), packed.pointwise_first, relu, packed.isa)


def reference(x: torch.Tensor, depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias, stride, padding,
              dilation, relu: bool = False, *, pointwise_first: bool = False,
              first_pointwise: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """:func:`run`'s function as the convolutions themselves."""
    def depthwise(t):
        return F.conv2d(t, depthwise_weight, depthwise_bias, tuple(stride), tuple(padding), tuple(dilation),
                        depthwise_weight.shape[0])

    if first_pointwise is not None:
        x = F.conv2d(x, *first_pointwise)
    if pointwise_first:
        out = depthwise(F.conv2d(x, pointwise_weight, pointwise_bias))
    else:
        out = F.conv2d(depthwise(x), pointwise_weight, pointwise_bias)
    return torch.relu(out) if relu else out


# Calls of at most DIRECT_MAX_PIXELS output pixels (batch x rows x columns) run the kernel at
# batch <= 2 in channels-last, at batch 1 in NCHW: there it was faster than both library forms
# (the F.conv2d calls, and oneDNN's prepacked convolutions) on every layer of the VGG grid,
# 32-512 channels, DSC, BSConv-U and BSConv-S (its time over the faster form's: 0.17-0.99
# channels-last, 0.26-0.94 NCHW at batch 1). From batch 4 on oneDNN's 1x1 convolution
# outpaces the kernel's pointwise part on some shapes, and an NCHW input's two layout copies
# cost more from batch 2 (benchmarks/separable_direct.py, results/cpu/*-separable-direct.md).
DIRECT_MAX_BATCH = 2
DIRECT_MAX_BATCH_NCHW = 1
DIRECT_MAX_PIXELS = 2048


def pays(batch: int, out_height: int, out_width: int, channels_last: bool = True) -> bool:
    """Whether a call of this batch, output map and input format runs the kernel (the rule above)."""
    most = DIRECT_MAX_BATCH if channels_last else DIRECT_MAX_BATCH_NCHW
    return batch <= most and batch * out_height * out_width <= DIRECT_MAX_PIXELS


def why_not(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take this eager inference call, or None."""
    if watched():
        return "a tracer, exporter, graph capture or dispatch mode is watching (standard operators only)"
    if x.device.type != "cpu" or x.dtype != torch.float32 or depthwise_weight.dtype != torch.float32:
        return f"the kernel runs float32 on the CPU (got {x.dtype} on {x.device})"
    if torch.is_grad_enabled() and (x.requires_grad or depthwise_weight.requires_grad
                                    or pointwise_weight.requires_grad):
        return "autograd is recording (the kernel is for inference)"
    if not hetconv_direct.available():
        return f"the C++ kernel is unavailable ({hetconv_direct.unavailable_reason()})"
    return None
