"""What DSC, BSConv-U and BSConv-S share to run the direct separable kernel
(:mod:`leanconv.ops.separable_direct`) in their own forward: where it applies and pays, the
packed weights kept by the layer (packed again after a weight changes), the output
activation that :func:`leanconv.optimize_for_inference` moved into the last convolution."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import hetconv_direct, separable_direct
from ..ops.conv_geometry import conv_output_size
from .depthwise import DepthwiseConv2d
from .prepacked import PrepackedConv2d, numeric_padding

__all__ = ["DirectSeparable"]

# The convolutions the kernel stands in for: plain ones, or optimize_for_inference's (a
# subclass with a forward of its own is left to it).
_PLAIN = (nn.Conv2d, PrepackedConv2d, DepthwiseConv2d)


def _plain_pointwise(conv: nn.Module) -> bool:
    return (type(conv) in _PLAIN and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), "valid"))


def _applies(depthwise: nn.Module, pointwise: nn.Module, input_channels: int, pointwise_first: bool,
             first_pointwise: nn.Module | None) -> bool:
    """A depthwise convolution of multiplier 1 with zero padding and plain unstrided 1x1s,
    none watched by hooks, the depthwise one not pinned to another backend, and no activation
    but after the last."""
    order = [depthwise, pointwise] if not pointwise_first else [c for c in (first_pointwise, pointwise, depthwise) if c]
    channels = pointwise.out_channels if pointwise_first else input_channels
    return (depthwise.groups == channels and depthwise.in_channels == channels and depthwise.out_channels == channels
            and depthwise.padding_mode == "zeros" and type(depthwise) in _PLAIN and _plain_pointwise(pointwise)
            and (first_pointwise is None or _plain_pointwise(first_pointwise))
            and all(getattr(conv, "activation", None) is None for conv in order[:-1])
            and getattr(order[-1], "activation", None) in (None, "relu", "relu6", "silu")
            and not any(conv._forward_hooks or conv._forward_pre_hooks for conv in order)
            and getattr(depthwise, "backend", None) in (None, "auto", "torch"))


def _channels_last(x: torch.Tensor) -> bool:
    """Stored channels-last (a tensor that is both, e.g. of 1x1 maps, counts as NCHW)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class DirectSeparable:
    """Mixin of the layers whose forward is a depthwise and one or two pointwise convolutions: their
    eager CPU inference calls that the kernel takes (:func:`~leanconv.ops.separable_direct.pays`)
    run it; every other call runs the two convolutions."""

    def _direct(self, input: torch.Tensor, depthwise: nn.Module, pointwise: nn.Module, *,
                pointwise_first: bool, first_pointwise: nn.Module | None = None) -> torch.Tensor | None:
        """The layer's output by the kernel, or None where it does not apply or pay."""
        if not _applies(depthwise, pointwise, input.shape[1], pointwise_first, first_pointwise):
            return None
        padding = numeric_padding(depthwise)
        if padding is None:
            return None
        sizes = [conv_output_size(input.shape[2 + d], depthwise.kernel_size[d], depthwise.stride[d], padding[d],
                                  depthwise.dilation[d]) for d in (0, 1)]
        if (min(sizes) < 1 or not separable_direct.pays(input.shape[0], *sizes, _channels_last(input))  # (the library form names a too small input)
                or separable_direct.why_not(input, depthwise.weight, pointwise.weight)):
            return None
        params = (depthwise.weight, depthwise.bias, pointwise.weight, pointwise.bias)
        first = None if first_pointwise is None else (first_pointwise.weight, first_pointwise.bias)
        try:
            stamp = (tuple((t._version, t.data_ptr()) if t is not None else None for t in params + (first or ())),
                     hetconv_direct.active_isa())
        except RuntimeError:  # parameters made under inference_mode have no version counter: no cache
            stamp = None
        cached = self.__dict__.get("_direct_packed")
        if stamp is not None and cached is not None and cached[0] == stamp:
            packed = cached[1]
        else:
            packed = separable_direct.pack(*params, pointwise_first=pointwise_first, first_pointwise=first)
            if stamp is not None:
                self.__dict__["_direct_packed"] = (stamp, packed)
        activation = getattr(depthwise if pointwise_first else pointwise, "activation", None)
        out = separable_direct.run(input, packed, depthwise.kernel_size, depthwise.stride, padding, depthwise.dilation,
                                   relu=activation == "relu")
        if activation == "relu6":
            return F.relu6(out, inplace=True)
        if activation == "silu":
            return F.silu(out, inplace=True)
        return out

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_direct_packed", None)  # a cache, rebuilt on the next call
        return state
