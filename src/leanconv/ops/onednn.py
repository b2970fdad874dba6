"""oneDNN convolutions with a prepacked weight, for CPU inference.

``F.conv2d`` on the CPU picks between oneDNN and PyTorch's own im2col kernel
(``aten::_slow_conv2d_forward``) per call (torch 2.13, ``ConvParams::use_mkldnn``): a
float32 call with ``groups == 1``, a kernel not larger than 3 on both sides, batch 1 and
at most 20,480 input elements goes to the im2col kernel, and so does an unstrided 1x1
convolution of a batch under 16 on one thread; oneDNN's calls reorder the weight into its
blocked layout on every call. Both cost most at batch 1, where a network's
convolutions are small: the whole-network inference path
(:func:`leanconv.optimize_for_inference`) calls oneDNN directly, with the weight
reordered once (:func:`prepack`), and lets oneDNN apply the activation, and a residual
addition, to the output in registers (its post-ops).

:func:`reference` is the same function in PyTorch operators: what the tests compare
:func:`conv2d` with, and what a call that oneDNN cannot take runs (:func:`why_not`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import watched

__all__ = ["ACTIVATIONS", "available", "why_not", "prepack", "conv2d", "conv2d_accumulate_", "reference"]

# The activations oneDNN applies as a post-op: leanconv's name -> (oneDNN's attribute,
# its scalars). ReLU6 is hardtanh(0, 6); SiLU is oneDNN's swish.
ACTIVATIONS = {
    "relu": ("relu", []),
    "relu6": ("hardtanh", [0.0, 6.0]),
    "silu": ("swish", []),
}


def available() -> bool:
    """oneDNN is built into this torch and has its fused convolution op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def why_not(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None) -> str | None:
    """Why oneDNN's prepacked call cannot take this call (then :func:`reference` runs), or
    None. The op has no autograd formula, so any call that records a graph, or that a
    tracer, exporter, graph capture or dispatch mode (FlopCounterMode) watches, takes the
    standard operators."""
    if watched():
        return "a tracer, exporter or dispatch mode is watching (standard operators only)"
    if not available():
        return "this torch is built without oneDNN"
    if input.device.type != "cpu" or input.dtype != torch.float32 or weight.dtype != torch.float32:
        return f"oneDNN's path is for float32 CPU tensors (got {input.dtype} on {input.device})"
    if input.dim() != 4:
        return f"oneDNN's path takes batched (N, C, H, W) inputs (got {input.dim()} dimensions)"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual)):
        return "autograd is recording (the op has no gradient)"
    if residual is not None and (residual.dtype != torch.float32 or residual.device.type != "cpu"):
        return "the residual is not a float32 CPU tensor"
    return None


def prepack(weight: torch.Tensor, padding, stride, dilation, groups: int, input_shape) -> torch.Tensor:
    """``weight`` (N, C/groups, kh, kw) reordered once into the blocked layout oneDNN picks for
    inputs of ``input_shape`` (an opaque tensor: use it only in :func:`conv2d`)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.detach().contiguous(memory_format=torch.channels_last), list(padding), list(stride), list(dilation),
        groups, list(input_shape))


def conv2d(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, padding, stride, dilation,
           groups: int, activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(conv2d(input, weight, bias) + residual)`` by oneDNN with the weight
    :func:`prepack`-ed. The output is in oneDNN's format (channels-last); ``residual``
    must have the output's shape."""
    unary, scalars = ACTIVATIONS[activation] if activation else ("none", [])
    padding, stride, dilation = list(padding), list(stride), list(dilation)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(input, packed, bias, padding, stride, dilation, groups,
                                                       unary, scalars, "")
    # oneDNN's binary post-op takes a ReLU after it, no other activation (torch 2.13)
    after_add = "relu" if activation == "relu" else None
    out = torch.ops.mkldnn._convolution_pointwise.binary(
        input, residual, packed, bias, padding, stride, dilation, groups, "add", 1.0, after_add, [], "")
    if activation == "relu6":
        return F.relu6(out, inplace=True)
    if activation == "silu":
        return F.silu(out, inplace=True)
    return out


def conv2d_accumulate_(accumulator: torch.Tensor, input: torch.Tensor, packed: torch.Tensor, padding, stride,
                       dilation, groups: int) -> torch.Tensor:
    """``accumulator += conv2d(input, weight)`` in place, by oneDNN with the weight
    :func:`prepack`-ed (its sum post-op); ``accumulator`` has the output's shape, channels-last."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        accumulator, input, packed, None, list(padding), list(stride), list(dilation), groups, "add", 1.0, None, [],
        None)


def reference(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, stride, dilation,
              groups: int, activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`conv2d`'s function in PyTorch operators (``weight`` unpacked)."""
    out = F.conv2d(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    if residual is not None:
        out = out + residual
    if activation == "relu":
        return torch.relu(out)
    if activation == "relu6":
        return F.relu6(out)
    if activation == "silu":
        return F.silu(out)
    return out
