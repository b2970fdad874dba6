"""DepthwiseConv2d: ``nn.Conv2d`` with ``groups == in_channels`` and a choice of
implementation (``torch`` or the Triton kernels), the spatial part of DSConv2d,
BSConvU2d and BSConvS2d.

It *is* an ``nn.Conv2d`` (same parameters, state_dict keys, ``_conv_forward``),
so everything that knows convolutions (BN folding, cost accounting, export)
treats it as one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.autotune import autotune_tracing, layer_memo_key, needs_autograd, stream_capturing
from ..ops.conv_geometry import check_conv_input, pad_for_mode
from ..ops import depthwise as depthwise_ops
from ..ops.depthwise import (
    check_depthwise_backend,
    choose_depthwise_backend,
    depthwise_conv2d,
    requested_depthwise_backend,
)

__all__ = ["DepthwiseConv2d"]


class DepthwiseConv2d(nn.Conv2d):
    r"""Depthwise KxK convolution: ``nn.Conv2d(in_channels, out_channels, ..., groups=in_channels)``
    with ``out_channels = D * in_channels`` (D the depth multiplier).

    ``backend``: ``None`` (the environment variable ``LEANCONV_DEPTHWISE_BACKEND``,
    else ``"auto"``), ``"auto"``, ``"torch"`` (``F.conv2d``) or ``"triton"`` (the
    direct kernels, where Triton is installed; see :mod:`leanconv.ops.depthwise`).
    ``auto`` runs ``torch`` except on CUDA, where it measures both once per input
    setting and keeps the faster. ``last_backend`` names the one that ran last.

    Arguments in nn.Conv2d's order (``groups``, if given, must be ``in_channels``),
    then the keyword ``backend``. Shapes and cost as nn.Conv2d: (B, M, H, W) or
    (M, H, W) -> (B, M*D, Ho, Wo); Ho*Wo*M*D*kh*kw MACs per image, M*D*kh*kw (+ M*D)
    parameters.

    Being a subclass, it is not what code matching ``type(m) is nn.Conv2d`` looks
    for: eager-mode quantization (``torch.ao.quantization.fuse_modules``) does not
    know it; :func:`leanconv.export.prepare_for_export` turns it into a plain
    ``nn.Conv2d``, and :func:`leanconv.fuse` folds a following BatchNorm into it.

    Example::

        dw = leanconv.layers.DepthwiseConv2d(32, 32, 3, padding=1)
        y = dw(torch.randn(2, 32, 16, 16))                 # (2, 32, 16, 16)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        groups: int | None = None,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        if groups is not None and groups != in_channels:
            raise ValueError(
                f"DepthwiseConv2d: groups must equal in_channels ({in_channels}) or be left out, got groups={groups!r}"
            )
        if isinstance(in_channels, int) and isinstance(out_channels, int) and in_channels > 0 and out_channels % in_channels:
            raise ValueError(
                f"DepthwiseConv2d: out_channels must be a multiple of in_channels (the depth multiplier), "
                f"got in_channels={in_channels}, out_channels={out_channels}"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups=in_channels,
            bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._backend = check_depthwise_backend(backend, "DepthwiseConv2d: backend")
        self.last_backend: str | None = None

    @property
    def backend(self) -> str | None:
        """The requested backend (None: environment, else auto)."""
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend = check_depthwise_backend(name, "DepthwiseConv2d: backend")

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (f", backend={self._backend!r}" if self._backend is not None else "")

    def _symmetric_padding(self) -> tuple[int, int] | None:
        """Padding per side as a pair, or None for "same" with an odd total (asymmetric)."""
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in totals):
                return None
            return (totals[0] // 2, totals[1] // 2)
        return tuple(self.padding)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        requested = self._backend or requested_depthwise_backend(None)
        if requested == "torch" or (requested == "auto" and input.device.type not in depthwise_ops.MEASURED_DEVICES):
            # The common path, kept short: nn.Conv2d itself (which checks its input).
            self.__dict__["last_backend"] = "torch"
            return super().forward(input)
        check_conv_input(input, self.in_channels, "DepthwiseConv2d")
        padding = self._symmetric_padding()
        if padding is None or (requested == "auto" and autotune_tracing()):
            if requested == "triton":
                raise ValueError(
                    f"DepthwiseConv2d: backend 'triton' needs symmetric padding; padding='same' with "
                    f"kernel_size={self.kernel_size}, dilation={self.dilation} pads unevenly (use backend='torch')"
                )
            self.__dict__["last_backend"] = "torch"
            return super().forward(input)
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        x, padding = pad_for_mode(x, padding, self.padding_mode)
        if requested == "auto":
            requested = self._auto(x, padding)
        self.__dict__["last_backend"] = requested
        out = depthwise_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, requested)
        return out.squeeze(0) if unbatched else out

    def _auto(self, x: torch.Tensor, padding: tuple[int, int]) -> str:
        """``auto`` where it measures (CUDA), remembered per input setting on the layer."""
        needs_grad = needs_autograd(x, self)
        memo_key = layer_memo_key(x, needs_grad, padding)
        memo = self.__dict__.setdefault("_auto_memo", {})
        name = memo.get(memo_key)
        if name is None:
            name = choose_depthwise_backend(x, self.weight, self.bias, self.stride, padding, self.dilation, needs_grad)
            if not stream_capturing(x):  # a choice made without measuring only for the capture
                memo[memo_key] = name
        return name

    def __getstate__(self):
        # Copies and pickles leave the measured choices behind.
        state = self.__dict__.copy()
        state.pop("_auto_memo", None)
        return state
