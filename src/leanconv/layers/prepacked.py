"""``PrepackedConv2d``: an ``nn.Conv2d`` for CPU inference through oneDNN with its weight
reordered once, the activation and a residual addition applied by oneDNN's post-ops
(:mod:`leanconv.ops.onednn`). :func:`leanconv.optimize_for_inference` puts one in place of
every plain convolution of a model (the stem, 1x1 downsamples, heads, and the
convolutions inside DSC, BSConv and GWC+PWC layers)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import onednn

__all__ = ["PrepackedConv2d", "numeric_padding", "why_not_prepackable"]

# Packed weights kept per layer, one per input shape (oneDNN's blocked layout is chosen
# for an input shape): a model called at a few batch sizes keeps one of each.
_SHAPES_KEPT = 4


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """``conv.padding`` as two numbers, or None for a 'same' padding that is uneven."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)
    return tuple(conv.padding)


def _why_not_geometry(conv: nn.Conv2d) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (oneDNN pads with zeros only)"
    if numeric_padding(conv) is None:
        return "an uneven 'same' padding (oneDNN pads both sides alike)"
    return None


def why_not_prepackable(conv: nn.Module) -> str | None:
    """Why ``conv`` (an ``nn.Conv2d``) cannot become a :class:`PrepackedConv2d`, or None."""
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    why = _why_not_geometry(conv)
    if why:
        return why
    if conv.weight.device.type != "cpu" or conv.weight.dtype != torch.float32:
        return f"its weight is {conv.weight.dtype} on {conv.weight.device} (oneDNN's path is for float32 on the CPU)"
    return None


class PrepackedConv2d(nn.Conv2d):
    """``activation(conv2d(input) + residual)``: an ``nn.Conv2d`` (the same parameters and
    ``state_dict``) whose eager CPU float32 inference calls run oneDNN with the weight
    reordered once per input shape and kept (again after the weight changes), with
    ``activation`` (None, ``"relu"``, ``"relu6"``, ``"silu"``) and the optional ``residual``
    applied in oneDNN's post-ops. Every other call (autograd, tracing, export,
    ``torch.compile``, a dispatch mode, another device or dtype) runs the same function in
    standard operators (:func:`leanconv.ops.onednn.reference`).

    The output has the input's memory format, as ``nn.Conv2d``'s: oneDNN writes
    channels-last, so an NCHW input costs a copy of each output; feed channels-last
    inputs (``x.contiguous(memory_format=torch.channels_last)``)."""

    def __init__(self, *args, activation: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.activation = activation
        why = _why_not_geometry(self)
        if why:
            raise ValueError(f"PrepackedConv2d: {why}")
        self.padding = numeric_padding(self)
        if activation is not None and activation not in onednn.ACTIVATIONS:
            raise ValueError(f"PrepackedConv2d: activation must be None or one of "
                             f"{sorted(onednn.ACTIVATIONS)}, got {activation!r}")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str | None = None) -> PrepackedConv2d:
        """A PrepackedConv2d computing ``activation(conv(x))`` that shares ``conv``'s
        parameters (so a tied weight stays tied) and keeps its hooks; ``conv`` must pass
        :func:`why_not_prepackable`."""
        why = why_not_prepackable(conv)
        if why:
            raise ValueError(f"PrepackedConv2d.from_conv: {why}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, numeric_padding(conv),
                  conv.dilation, conv.groups, bias=conv.bias is not None, device="meta", activation=activation)
        new.weight = conv.weight
        new.bias = conv.bias
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):
            getattr(new, hooks).update(getattr(conv, hooks))
        return new.train(conv.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_packed", None)  # oneDNN's opaque tensors neither copy nor pickle
        return state

    def _packed_weight(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        try:
            version = weight._version
        except RuntimeError:  # a weight made under inference_mode has no version counter: packed per call
            return onednn.prepack(weight, self.padding, self.stride, self.dilation, self.groups, input.shape)
        key = (tuple(input.shape), weight.data_ptr(), version, self.padding, self.stride, self.dilation, self.groups)
        kept = self.__dict__.setdefault("_packed", {})
        packed = kept.get(key)
        if packed is None:
            if len(kept) >= _SHAPES_KEPT:
                kept.clear()
            packed = kept[key] = onednn.prepack(weight, self.padding, self.stride, self.dilation, self.groups,
                                                input.shape)
        return packed

    def _output_shape(self, input: torch.Tensor) -> tuple[int, ...]:
        sizes = [(size + 2 * pad - dil * (k - 1) - 1) // step + 1 for size, pad, dil, k, step in
                 zip(input.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return (input.shape[0], self.out_channels, *sizes)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        arguments = (self.padding, self.stride, self.dilation, self.groups, self.activation, residual)
        if onednn.why_not(input, self.weight, self.bias, residual) is not None:
            return onednn.reference(input, self.weight, self.bias, *arguments)
        shape = self._output_shape(input)
        if min(shape[2:]) < 1 or (residual is not None and tuple(residual.shape) != shape):
            # an input smaller than the kernel gets nn.Conv2d's error; a residual of another
            # shape broadcasts as torch does
            return onednn.reference(input, self.weight, self.bias, *arguments)
        out = onednn.conv2d(input, self._packed_weight(input), self.bias, *arguments)
        if not input.is_contiguous(memory_format=torch.channels_last):
            return out.contiguous()
        return out
