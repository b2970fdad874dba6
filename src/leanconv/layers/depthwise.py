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
import torch.nn.functional as F

from ..ops.conv_geometry import DepthwiseGeometry
from ._common import DispatchedLayer
from .protocol import LeanConvLayer, conv_macs_per_output

__all__ = ["DepthwiseConv2d"]


class DepthwiseConv2d(DispatchedLayer, LeanConvLayer, nn.Conv2d):
    r"""Depthwise KxK convolution: ``nn.Conv2d(in_channels, out_channels, ..., groups=in_channels)``
    with ``out_channels = D * in_channels`` (D the depth multiplier).

    ``backend``: ``None`` (the configuration in force: ``leanconv.ops.use_depthwise_backend``,
    ``set_depthwise_backend``, ``LEANCONV_DEPTHWISE_BACKEND``, else ``"auto"``), ``"auto"``,
    ``"torch"`` (``F.conv2d``) or ``"triton"`` (the direct kernels, where Triton is
    installed; see :mod:`leanconv.ops.backends`). ``auto`` runs ``torch``, or, with
    measuring on (``leanconv.config.set_benchmark``), the faster of the two as
    measured once per input setting. ``last_backend`` names the one that ran last.

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

    _OP = "depthwise"

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
        self._backend = self._check_backend(backend)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (f", backend={self._backend!r}" if self._backend is not None else "")

    def _geometry(self) -> DepthwiseGeometry:
        """The convolution's arguments, rebuilt when one of nn.Conv2d's public
        attributes is reassigned after construction."""
        stamp = (self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode)
        cached = self.__dict__.get("_geometry_cache")
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if self.padding_mode != "zeros" or self.padding == "valid":
            padding = (0, 0)
        elif self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            padding = None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)
        else:
            padding = tuple(self.padding)
        geometry = DepthwiseGeometry(
            self.in_channels, self.out_channels, tuple(self.kernel_size), tuple(self.stride), padding,
            tuple(self.dilation),
        )
        self.__dict__["_geometry_cache"] = (stamp, geometry)
        return geometry

    # ------------------------------------------------- the layer protocol (protocol.py)
    counting_backend = "torch"

    def mac_stages(self) -> list[tuple[nn.Module, int]]:
        return [(self, conv_macs_per_output(self.in_channels, self.kernel_size[0] * self.kernel_size[1], self.groups))]

    def batchnorm_absorber(self) -> nn.Module:
        return self

    def export_form(self, *, hetconv_form: str = "split") -> nn.Conv2d:
        """The plain ``nn.Conv2d`` it is (same parameters), so that no backend choice
        (``triton``, ``LEANCONV_DEPTHWISE_BACKEND``) reaches an exporter."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        conv.load_state_dict(self.state_dict())
        return conv.train(self.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        dispatcher = self.__dict__.get("_dispatcher") or self._get_dispatcher()
        params = self._parameters  # read directly: nn.Module.__getattr__ costs a microsecond a lookup
        return dispatcher(input, (params["weight"],), params["bias"], self._geometry(), self._backend)
