"""The direct depthwise-separable kernel: DSC (a depthwise KxK convolution then a 1x1) in
one pass on the CPU, for inference (:file:`leanconv/kernels/separable_direct.h`, in the
same C++ extension as the direct HetConv kernel, compiled per ISA the same way).

DSC: Howard et al., "MobileNets", 2017, https://arxiv.org/abs/1704.04861.

:func:`pack` lays the weights out for one ISA's vector width (the depthwise bias folded
into the pointwise one); :func:`run` calls the kernel (the registered op
``torch.ops.leanconv.separable_direct_packed``); :func:`reference` is the same function
as the two convolutions, what the tests compare the kernel with. :func:`why_not` says
where the kernel does not apply; :class:`leanconv.DSConv2d` runs its library form there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import hetconv_direct
from .registry import under_dispatch_mode

__all__ = ["DIRECT_MAX_BATCH", "DIRECT_MAX_PIXELS", "PackedSeparable", "pack", "pays", "run", "reference", "why_not"]


@dataclass(frozen=True)
class PackedSeparable:
    """A DSC layer's weights laid out for the kernel of ``isa``: ``depthwise`` (taps, Mv),
    ``pointwise`` (tiles, M, tile width), ``bias`` (tiles * tile width)."""

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    bias: torch.Tensor
    out_channels: int
    isa: str


def pack(depthwise_weight: torch.Tensor, depthwise_bias: torch.Tensor | None, pointwise_weight: torch.Tensor,
         pointwise_bias: torch.Tensor | None, isa: str | None = None) -> PackedSeparable:
    """Lay out ``depthwise_weight`` (M, 1, KH, KW), ``pointwise_weight`` (N, M, 1, 1) and
    their biases for ``isa``'s kernel (default: the active ISA)."""
    isa = isa or hetconv_direct.active_isa()
    lanes = hetconv_direct.lanes(isa)
    channels, out_channels = depthwise_weight.shape[0], pointwise_weight.shape[0]
    taps = depthwise_weight.shape[2] * depthwise_weight.shape[3]
    padded = -(-channels // lanes) * lanes
    with torch.no_grad():
        depthwise = torch.zeros(taps, padded, dtype=torch.float32)
        depthwise[:, :channels] = depthwise_weight.detach().float().reshape(channels, taps).t()
        matrix = pointwise_weight.detach().float().reshape(out_channels, channels)
        tile = hetconv_direct.tile_width(out_channels, isa)
        tiles = -(-out_channels // tile)
        pointwise = torch.zeros(tiles * tile, channels, dtype=torch.float32)
        pointwise[:out_channels] = matrix
        pointwise = pointwise.reshape(tiles, tile, channels).transpose(1, 2).contiguous()
        bias = torch.zeros(tiles * tile, dtype=torch.float64)
        if pointwise_bias is not None:
            bias[:out_channels] += pointwise_bias.detach().double()
        if depthwise_bias is not None:
            bias[:out_channels] += matrix.double() @ depthwise_bias.detach().double()
    return PackedSeparable(depthwise.contiguous(), pointwise, bias.float(), out_channels, isa)


def run(x: torch.Tensor, packed: PackedSeparable, kernel_size, stride, padding, dilation,
        relu: bool = False) -> torch.Tensor:
    """The layer on ``x`` (B, M, H, W) by the kernel; the output has ``x``'s memory format."""
    return torch.ops.leanconv.separable_direct_packed(
        x, packed.depthwise, packed.pointwise, packed.bias, packed.out_channels, list(kernel_size), list(stride),
        list(padding), list(dilation), relu, packed.isa)


def reference(x: torch.Tensor, depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias, stride, padding,
              dilation, relu: bool = False) -> torch.Tensor:
    """:func:`run`'s function as the two convolutions."""
    mid = F.conv2d(x, depthwise_weight, depthwise_bias, tuple(stride), tuple(padding), tuple(dilation),
                   depthwise_weight.shape[0])
    out = F.conv2d(mid, pointwise_weight, pointwise_bias)
    return torch.relu(out) if relu else out


# Calls of at most this batch and these output pixels (batch x rows x columns) run the kernel:
# it was 1.2-2.2x faster than oneDNN's two prepacked convolutions there on every layer of
# the VGG grid (32-512 channels, batch 1-2), and is slower from batch 4-8 on, where oneDNN's
# 1x1 convolution outpaces its pointwise part (benchmarks/separable_direct.py, results/cpu/
# *-separable-direct.md).
DIRECT_MAX_BATCH = 2
DIRECT_MAX_PIXELS = 2048


def pays(batch: int, out_height: int, out_width: int) -> bool:
    """Whether a call of this batch and output map runs the kernel (the rule above)."""
    return batch <= DIRECT_MAX_BATCH and batch * out_height * out_width <= DIRECT_MAX_PIXELS


def why_not(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take this eager inference call, or None."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or under_dispatch_mode():
        return "a tracer, exporter, graph capture or dispatch mode is watching (standard operators only)"
    if x.device.type != "cpu" or x.dtype != torch.float32 or depthwise_weight.dtype != torch.float32:
        return f"the kernel runs float32 on the CPU (got {x.dtype} on {x.device})"
    if torch.is_grad_enabled() and (x.requires_grad or depthwise_weight.requires_grad
                                    or pointwise_weight.requires_grad):
        return "autograd is recording (the kernel is for inference)"
    if depthwise_weight.shape[0] != x.shape[1] or depthwise_weight.shape[1] != 1:
        return "a depth multiplier above 1 (the kernel reads one input channel per depthwise channel)"
    if not hetconv_direct.available():
        return f"the C++ kernel is unavailable ({hetconv_direct.unavailable_reason()})"
    return None
