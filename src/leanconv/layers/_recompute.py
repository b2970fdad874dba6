"""Training a depthwise-then-pointwise layer (DSC) without keeping the depthwise output.

Autograd keeps the pointwise 1x1 convolution's input, the depthwise output (as large as the
layer's input), for the 1x1's weight gradient: with the depthwise convolution's own input,
a DSC layer keeps twice what an ``nn.Conv2d`` keeps. The depthwise convolution costs
K*K/N of the 1x1's MACs, so :func:`pointwise_recomputing_depthwise` has the backward pass
compute it again from the layer's input (which the depthwise convolution keeps anyway)
instead: a saved-tensor hook (``torch.autograd.graph.saved_tensors_hooks``) swaps the
saved depthwise output for the recipe. Under ``create_graph`` the recomputation is
differentiable, so double backward stays exact.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["recompute_usable", "pointwise_recomputing_depthwise"]


def recompute_usable(depthwise: nn.Module) -> bool:
    """Whether the hook may be used: autograd records eagerly, no saved-tensor hooks of the
    user's (``torch.utils.checkpoint``, offloading) are in charge, no torch.func transform,
    tracer or graph capture runs, and no hook on the depthwise convolution would see its
    second call."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._autograd._saved_tensors_hooks_get_disabled_error_message() is not None:
        return False
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return not (depthwise._forward_hooks or depthwise._forward_pre_hooks)


class _Recompute:
    """What the backward pass keeps instead of the depthwise output: how to compute it again."""

    __slots__ = ("depthwise", "input")

    def __init__(self, depthwise: nn.Module, input: torch.Tensor) -> None:
        self.depthwise, self.input = depthwise, input

    def __call__(self) -> torch.Tensor:
        return self.depthwise(self.input)  # in the backward pass's grad mode: a graph only under create_graph


def pointwise_recomputing_depthwise(depthwise: nn.Module, pointwise: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """``pointwise(depthwise(input))``, whose backward recomputes ``depthwise(input)``."""
    mid = depthwise(input)
    if not mid.requires_grad:
        return pointwise(mid)
    recipe = _Recompute(depthwise, input)
    signature = (mid.data_ptr(), mid.shape, mid.stride(), mid.dtype)  # the hooks hold no reference to it

    def pack(tensor: torch.Tensor):
        same = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype) == signature
        return recipe if same else tensor

    def unpack(saved):
        return saved() if saved is recipe else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return pointwise(mid)  # once it returns, nothing holds the depthwise output
