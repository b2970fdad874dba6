"""Depthwise-separable and group-wise + pointwise convolutions.

DSC: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications", 2017, https://arxiv.org/abs/1704.04861.
GWC + PWC: the group-wise + pointwise baseline of the HetConv paper,
https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.conv_geometry import check_conv_input
from ._common import conv_arguments, describe_spatial
from .depthwise import DepthwiseConv2d
from ..ops.least_squares import ridge_solve
from ..ops.low_rank import low_rank_factors
from ._direct import DirectSeparable
from ._recompute import pointwise_recomputing_depthwise, recompute_usable
from .protocol import LeanConvLayer, fold_batchnorm, write_bias, write_parameter

__all__ = ["DSConv2d", "GWPWConv2d"]


class _SpatialThenPointwise(DirectSeparable, LeanConvLayer, nn.Module):
    """What DSC and GWC+PWC share: a spatial KxK convolution (``_SPATIAL`` names it), an
    optional BN, a pointwise 1x1 ``pw``; a following BN folds into ``pw``, their own into
    the spatial convolution."""

    _SPATIAL = "dw"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_conv_input(input, self.in_channels, type(self).__name__)
        if self.bn is None and input.dim() == 4:
            out = self._direct(input, getattr(self, self._SPATIAL), self.pw, pointwise_first=False)
            if out is not None:
                return out
        spatial = getattr(self, self._SPATIAL)
        if self.bn is None and spatial.groups == spatial.in_channels and recompute_usable(spatial):
            return pointwise_recomputing_depthwise(spatial, self.pw, input)  # training keeps no depthwise output
        x = spatial(input)
        if self.bn is not None:
            x = self.bn(x) if input.dim() == 4 else self.bn(x.unsqueeze(0)).squeeze(0)
        return self.pw(x)

    def inference_form(self, *, merge_bsconv_s: bool = True) -> nn.Module:
        if self.bn is not None:
            fold_batchnorm(getattr(self, self._SPATIAL), self.bn)
            self.bn, self.with_bn = None, False
        return self.eval()

    def batchnorm_absorber(self) -> nn.Module:
        return self.pw

    # ------------------------------------------------------ calibration (protocol.py)
    def _spatial_index(self) -> torch.Tensor:
        """(M', M/groups * T): the dense patch feature (channel * T + tap) of each entry of
        the spatial weight, row by row."""
        spatial = getattr(self, self._SPATIAL)
        out, per_group = spatial.out_channels, spatial.in_channels // spatial.groups
        taps = spatial.kernel_size[0] * spatial.kernel_size[1]
        group_of = torch.arange(out) // (out // spatial.groups)
        channels = group_of[:, None] * per_group + torch.arange(per_group)  # (M', M/groups)
        return (channels[:, :, None] * taps + torch.arange(taps)).reshape(out, per_group * taps)

    def _spatial_dense(self, flat: torch.Tensor) -> torch.Tensor:
        """(M', M*T) dense form of the spatial weight given as (M', M/groups*T)."""
        taps = math.prod(getattr(self, self._SPATIAL).kernel_size)
        full = torch.zeros(len(flat), self.in_channels * taps, dtype=flat.dtype)
        full[torch.arange(len(flat))[:, None], self._spatial_index()] = flat
        return full

    def dense_equivalent(self) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = getattr(self, self._SPATIAL)
        flat = spatial.weight.detach().double().cpu().flatten(1)
        pw = self.pw.weight.detach().double().cpu().flatten(1)
        bias = torch.zeros(len(pw), dtype=torch.float64)
        if self.pw.bias is not None:
            bias = bias + self.pw.bias.detach().double().cpu()
        if spatial.bias is not None:
            bias = bias + pw @ spatial.bias.detach().double().cpu()
        return (pw @ self._spatial_dense(flat)).reshape(len(pw), self.in_channels, *spatial.kernel_size), bias

    def calibration_blocker(self) -> str:
        return "not fitted: a BatchNorm inside the layer" if self.with_bn else ""

    @torch.no_grad()
    def transfer_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[float, float]:
        """Per group g, the truncated SVD W[:, g] (N, Mg*T) ~ pw[:, outputs of g] (N, rank) @
        kxk[outputs of g] (rank, Mg*T), rank = the spatial outputs per group."""
        n, m, kh, kw = weight.shape
        spatial = getattr(self, self._SPATIAL)
        groups = spatial.groups
        blocks = weight.reshape(n, groups, m // groups * kh * kw).permute(1, 0, 2)
        left, right, residual, total = low_rank_factors(blocks, spatial.out_channels // groups)
        write_parameter(spatial.weight, right)
        write_parameter(self.pw.weight, left.permute(1, 0, 2))
        write_bias(spatial, None)
        write_bias(self.pw, bias)
        return residual, total

    @torch.no_grad()
    def calibration_fit(self, moments, settings, free_bias: bool) -> tuple[str, torch.Tensor | None]:
        """Alternating least squares from the transferred weights, each half step an exact
        ridge solve: the pointwise weights (with the bias), then the KxK weights jointly
        (skipped where that would exceed ``settings.max_features`` unknowns: then only the
        pointwise half is fitted)."""
        spatial = getattr(self, self._SPATIAL)
        out = spatial.out_channels
        s = spatial.weight.detach().double().cpu().flatten(1)
        index = self._spatial_index()
        d = moments.gram.shape[0] - 1
        joint = s.numel() <= settings.max_features
        gram, cross = moments.gram, moments.cross
        has_bias = self.pw.bias is not None or free_bias
        weight, bias = self.dense_equivalent()
        pw = self.pw.weight.detach().double().cpu().flatten(1)
        flat = index.reshape(-1)
        kxk_gram = gram[flat][:, flat].reshape(out, s.shape[1], out, s.shape[1]) if joint else None
        for _ in range(max(1, settings.als_iterations)):
            # pointwise half: features z = S_full u (and 1)
            full = torch.zeros(out + 1, d + 1, dtype=torch.float64)
            full[torch.arange(out)[:, None], index] = s
            full[out, d] = 1.0
            keep = slice(None) if has_bias else slice(0, out)
            z_gram = (full @ gram @ full.mT)[keep, keep]
            solution = ridge_solve(z_gram, (full @ cross)[keep], settings.ridge, has_bias).mT  # (N, M'(+1))
            pw = solution[:, :out]
            bias = solution[:, out] if has_bias else torch.zeros(len(pw), dtype=torch.float64)
            if not joint or settings.als_iterations == 0:
                break
            # KxK half: unknowns S[j, e]; H = (pw^T pw)[j, j'] * G[index(j, e), index(j', e')]
            outer = pw.mT @ pw  # (M', M')
            h = (kxk_gram * outer[:, None, :, None]).reshape(len(flat), len(flat))
            target = cross[:d] - gram[:d, d:d + 1] * bias[None, :]  # (D, N): sum u (y - b)
            rhs = (target[flat].reshape(out, s.shape[1], -1) * pw.mT[:, None, :]).sum(-1).reshape(-1, 1)
            s = ridge_solve(h, rhs, settings.ridge, False).reshape(out, s.shape[1])
        write_parameter(spatial.weight, s)
        if spatial.bias is not None:
            spatial.bias.zero_()  # folded into the pointwise bias
        write_parameter(self.pw.weight, pw)
        if self.pw.bias is not None:
            write_parameter(self.pw.bias, bias)
        method = (f"alternating least squares, {settings.als_iterations} iterations" if joint else
                  f"pointwise least squares (the joint KxK solve would have {spatial.weight.numel():,} unknowns > "
                  f"max_features={settings.max_features})")
        return method, None if self.pw.bias is not None or not free_bias else bias


class DSConv2d(_SpatialThenPointwise):
    r"""Depthwise-separable convolution: depthwise KxK, optional BN, pointwise 1x1.

    Submodules: ``dw`` = DepthwiseConv2d(M, M*D, K, stride, padding, dilation)
    (an nn.Conv2d with groups=M; D the depth multiplier), ``bn`` =
    BatchNorm2d(M*D) when ``with_bn`` else None, ``pw`` = Conv2d(M*D, N, 1). No
    activation inside. With ``bias``, both convolutions have a bias, except
    ``dw`` when a BN follows it (the BN's shift replaces it).
    ``depthwise_backend`` picks the depthwise implementation (``None``/``"auto"``,
    ``"torch"``, ``"triton"``; see :class:`leanconv.layers.DepthwiseConv2d`).

    Shapes: (B, M, H, W) or (M, H, W) -> (B, N, Ho, Wo) or (N, Ho, Wo).
    Cost: Ho*Wo*M*D*(K*K + N) MACs per image; parameters M*D*K*K + M*D*N
    (+ M*D + N biases), e.g. 10 -> 32, K=3: 452 against nn.Conv2d's 2,912.

    Example::

        layer = leanconv.DSConv2d(10, 32, 3, padding=1)
        y = layer(torch.randn(2, 10, 16, 16))            # (2, 32, 16, 16)
        assert sum(t.numel() for t in layer.parameters()) == 452
    """

    kind = "dsc"
    kind_options = frozenset({"depth_multiplier", "with_bn", "bn_kwargs", "depthwise_backend"})

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        depth_multiplier: int = 1,
        with_bn: bool = False,
        bn_kwargs: dict | None = None,
        depthwise_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = conv_arguments("DSConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                                 padding_mode, device, dtype).factory
        if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ValueError(f"DSConv2d: depth_multiplier must be a positive int, got {depth_multiplier!r}")
        mid = in_channels * depth_multiplier
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth_multiplier, self.with_bn, self.has_bias = depth_multiplier, with_bn, bias
        self.dw = DepthwiseConv2d(
            in_channels, mid, kernel_size, stride, padding, dilation,
            bias=bias and not with_bn, padding_mode=padding_mode, backend=depthwise_backend, **factory,
        )
        self.bn = nn.BatchNorm2d(mid, **(bn_kwargs or {}), **factory) if with_bn else None
        self.pw = nn.Conv2d(mid, out_channels, 1, bias=bias, **factory)

    def extra_repr(self) -> str:
        extra = f", depth_multiplier={self.depth_multiplier}" if self.depth_multiplier != 1 else ""
        return describe_spatial(self, self.dw, self.has_bias, extra + (", with_bn=True" if self.with_bn else ""))


class GWPWConv2d(_SpatialThenPointwise):
    r"""Group-wise KxK convolution (G groups) followed by a pointwise 1x1: the
    GWC + PWC baseline of the HetConv paper.

    Submodules: ``gw`` = Conv2d(M, M, K, stride, padding, dilation, groups=G),
    ``bn`` = BatchNorm2d(M) when ``with_bn`` else None, ``pw`` = Conv2d(M, N, 1).
    No activation inside; biases as in :class:`DSConv2d`. ``groups=M`` is DSC.

    Shapes: (B, M, H, W) or (M, H, W) -> (B, N, Ho, Wo) or (N, Ho, Wo).
    Cost: Ho*Wo*M*(M/G*K*K + N) MACs per image, i.e. 1/G + 1/K^2 of the standard
    convolution when M = N; parameters M*M/G*K*K + M*N (+ biases).

    Example::

        layer = leanconv.GWPWConv2d(64, 64, 3, padding=1, groups=4)
        y = layer(torch.randn(2, 64, 8, 8))              # (2, 64, 8, 8)
        assert layer.gw.groups == 4
    """

    _SPATIAL = "gw"
    kind = "gwpw"
    kind_options = frozenset({"groups", "g", "with_bn", "bn_kwargs"})
    kind_required = {"groups|g": "the groups of the KxK convolution"}
    kind_divisor, kind_divides = ("groups", "g"), ("in_channels",)

    @classmethod
    def from_spec(cls, *conv_arguments, **options) -> nn.Module:
        groups = options.pop("groups", None)
        return cls(*conv_arguments, groups=options.pop("g", None) if groups is None else groups, **options)

    def summary_options(self) -> list[str]:
        return [f"groups={self.groups}", *super().summary_options()]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        groups: int,
        with_bn: bool = False,
        bn_kwargs: dict | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = conv_arguments("GWPWConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                                 padding_mode, device, dtype).factory
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"GWPWConv2d: groups must be a positive int, got {groups!r}")
        if in_channels % groups:
            raise ValueError(
                f"GWPWConv2d: groups must divide in_channels: in_channels={in_channels} is not divisible by groups={groups}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.with_bn, self.has_bias = with_bn, bias
        self.gw = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride, padding, dilation, groups=groups,
            bias=bias and not with_bn, padding_mode=padding_mode, **factory,
        )
        self.bn = nn.BatchNorm2d(in_channels, **(bn_kwargs or {}), **factory) if with_bn else None
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=bias, **factory)

    def extra_repr(self) -> str:
        return describe_spatial(self, self.gw, self.has_bias, f", groups={self.groups}" + (", with_bn=True" if self.with_bn else ""))
