"""ApproximateHetConv2d: the "approximate" HetConv of public repositories.

HetConv: Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for
Deep CNNs", CVPR 2019, https://arxiv.org/abs/1903.04120.

Public HetConv code (and the seed this project grew from) builds the layer as a
grouped KxK convolution plus a dense 1x1 convolution over all channels, summed.
This module reproduces that form, with the usual submodule names ``gwc`` and
``pwc``, so that such checkpoints load unchanged; :func:`leanconv.fuse` (or
:meth:`ApproximateHetConv2d.to_hetconv`) turns it into an exact
:class:`~leanconv.layers.HetConv2d`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.conv_geometry import check_conv_input, normalize_kernel_size, normalize_pair
from ..ops.hetconv_layout import check_hetconv_channels, zero_diagonal_pointwise
from ._common import conv_arguments
from .hetconv import HetConv2d
from .protocol import LeanConvLayer, mac_stages

__all__ = ["ApproximateHetConv2d"]


class ApproximateHetConv2d(LeanConvLayer, nn.Module):
    r"""Grouped KxK conv (groups = P) + dense 1x1 conv: **not** exact HetConv.

    ``y = gwc(x) + pwc(x)`` with

    * ``gwc`` = Conv2d(M, N, K, stride, padding, dilation, groups=P, bias,
      padding_mode): filter n's KxK kernels on the M/P channels of its group
      (HetConv's ``blocked`` layout);
    * ``pwc`` = Conv2d(M, N, 1, stride, padding - centre, bias=pwc_bias,
      padding_mode) over **all** M channels, where centre = dilation*(K-1)//2,
      so the 1x1 kernel reads the input under each window's centre tap.

    Compared with exact HetConv the 1x1 convolution also covers the M/P
    channels that already have a KxK kernel: N*M/P extra parameters and
    Ho*Wo*N*M/P extra MACs per image (plus a second bias when both convs have
    one). Those redundant weights only add to the KxK centre taps, so the layer
    reaches exactly the same set of functions as HetConv with the same P;
    :meth:`to_hetconv` folds them in and returns the exact layer.

    Shapes: (B, M, H, W) or (M, H, W) -> (B, N, Ho, Wo) or (N, Ho, Wo).
    Cost: Ho*Wo*N*(M/P*K*K + M) MACs per image (FLOPs = 2 x MACs); parameters
    N*(M/P*K*K + M) (+ N per bias).

    ``padding`` defaults to the centre offset (what public code uses: 1 for
    3x3); it must be at least that offset (the 1x1 branch cannot use negative
    padding), and equal to it with a non-"zeros" ``padding_mode``.

    Example::

        seed = leanconv.layers.ApproximateHetConv2d(64, 64, 3, padding=1, p=4)
        exact = seed.to_hetconv()                          # leanconv.HetConv2d, p=4
        assert torch.allclose(seed(x), exact(x), atol=1e-5)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=None,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        p: int,
        pwc_bias: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if padding is None:  # the centre offset, what public code uses
            kernel, dilation_pair = normalize_kernel_size(kernel_size), normalize_pair(dilation, "dilation")
            padding = (dilation_pair[0] * (kernel[0] - 1) // 2, dilation_pair[1] * (kernel[1] - 1) // 2)
        arguments = conv_arguments("ApproximateHetConv2d", in_channels, out_channels, kernel_size, stride, padding,
                                   dilation, padding_mode, device, dtype, odd_kernel=True)
        check_hetconv_channels(in_channels, out_channels, p)
        kernel, stride_pair, dilation_pair = arguments.kernel_size, arguments.stride, arguments.dilation
        padding_pair, factory = arguments.padding_pair, arguments.factory
        centre = (dilation_pair[0] * (kernel[0] - 1) // 2, dilation_pair[1] * (kernel[1] - 1) // 2)
        pointwise_padding = (padding_pair[0] - centre[0], padding_pair[1] - centre[1])
        if min(pointwise_padding) < 0:
            raise ValueError(
                f"ApproximateHetConv2d: padding={padding!r} is smaller than the centre offset {centre}; the 1x1 branch "
                "would need negative padding"
            )
        if padding_mode != "zeros" and pointwise_padding != (0, 0):
            raise ValueError(
                f"ApproximateHetConv2d: padding_mode={padding_mode!r} needs padding equal to the centre offset {centre}, "
                f"got {padding!r}"
            )
        self.in_channels, self.out_channels, self.p = in_channels, out_channels, p
        self.gwc = nn.Conv2d(
            in_channels, out_channels, kernel, stride_pair, padding_pair, dilation_pair, groups=p,
            bias=bias, padding_mode=padding_mode, **factory,
        )
        self.pwc = nn.Conv2d(
            in_channels, out_channels, 1, stride_pair, pointwise_padding,
            bias=bias if pwc_bias is None else pwc_bias, **factory,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_conv_input(input, self.in_channels, "ApproximateHetConv2d")
        return self.gwc(input) + self.pwc(input)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    # ------------------------------------------------- the layer protocol (protocol.py)
    fuse_report_field = "exact_hetconv"

    def mac_stages(self) -> list[tuple[nn.Module, int]]:
        """The two parallel branches are one stage (same output): their MACs add."""
        (gwc, per_gwc), (_, per_pwc) = mac_stages(self.gwc)[0], mac_stages(self.pwc)[0]
        return [(gwc, per_gwc + per_pwc)]

    def to_conv2d(self) -> nn.Conv2d:
        return self.to_hetconv().to_conv2d()

    def inference_form(self, *, merge_bsconv_s: bool = True) -> HetConv2d:
        """The exact HetConv2d (:meth:`to_hetconv`): N*M/P fewer weights."""
        return self.to_hetconv().eval()

    def to_hetconv(self, backend: str | None = None) -> HetConv2d:
        """The exact, blocked-layout HetConv2d computing the same function.

        The redundant 1x1 weights on each filter's own KxK channels are added to
        those kernels' centre taps, the two biases are summed.
        """
        gwc, pwc = self.gwc, self.pwc
        layer = HetConv2d.from_approximate(
            gwc.weight.detach(), pwc.weight.detach(),
            None if gwc.bias is None else gwc.bias.detach(), None if pwc.bias is None else pwc.bias.detach(),
            stride=gwc.stride, padding=gwc.padding, dilation=gwc.dilation, padding_mode=gwc.padding_mode,
            backend=backend,
        )
        return layer.train(self.training)

    @classmethod
    def from_hetconv(cls, layer: HetConv2d) -> "ApproximateHetConv2d":
        """The approximate form of an exact (blocked) HetConv2d, with the
        redundant 1x1 weights set to zero (same function, more parameters).

        The form public code trains."""
        if layer.layout != "blocked":
            raise ValueError(
                "ApproximateHetConv2d.from_hetconv needs a blocked-layout HetConv2d (the approximate form has no "
                "shifted variant); convert with layer.to_layout('blocked'), which permutes channels"
            )
        seed = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer._padding_pair,
            layer.dilation, layer.bias is not None, layer.padding_mode, p=layer.p, pwc_bias=False,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )
        with torch.no_grad():
            seed.gwc.weight.copy_(layer.weight)
            if layer.bias is not None:
                seed.gwc.bias.copy_(layer.bias)
            matrix = zero_diagonal_pointwise(layer.pointwise_weight, layer.in_channels, layer.out_channels, layer.p, "blocked")
            seed.pwc.weight.copy_(matrix[:, :, None, None])
        return seed.train(layer.training)


def __getattr__(name: str):
    """``SeedHetConv2d``, the former name (objects pickled under it still load), with a warning."""
    if name == "SeedHetConv2d":
        import warnings

        warnings.warn("SeedHetConv2d is now ApproximateHetConv2d (one name for the approximate HetConv form)",
                      DeprecationWarning, stacklevel=2)
        return ApproximateHetConv2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
