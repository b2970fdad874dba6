"""Blueprint separable convolutions, BSConv-U and BSConv-S.

Haase & Amthor, "Rethinking Depthwise Separable Convolutions: How Intra-Kernel
Correlations Lead to Improved MobileNets", CVPR 2020,
https://arxiv.org/abs/2003.13549.

Submodule names, defaults and state_dict keys are those of the official
``bsconv.pytorch.BSConvU`` / ``BSConvS`` (bsconv 0.4.0), so their checkpoints
load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.conv_geometry import check_conv_input
from ._common import conv_arguments, describe_spatial
from ._direct import DirectSeparable
from .depthwise import DepthwiseConv2d
from ..ops.least_squares import bordered_solve
from ..ops.low_rank import low_rank_factors
from .protocol import LeanConvLayer, batchnorm_affine, fold_batchnorm, regularizers, write_bias, write_parameter

__all__ = ["BSConvU2d", "BSConvS2d", "orthonormal_penalty", "bsconv_s_mid_channels"]


def _run_unbatched_safe(layer: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """Run the submodules in order, accepting (C, H, W) input like nn.Conv2d."""
    x = input.unsqueeze(0) if input.dim() == 3 else input
    for module in layer.children():
        x = module(x)
    return x.squeeze(0) if input.dim() == 3 else x


class _Blueprint(LeanConvLayer):
    """What BSConv-U and BSConv-S share: each filter is a blueprint (``dw``'s KxK kernel)
    scaled per input channel by a pointwise row, ``pointwise_rows()`` (N, M) =
    coefficients (N, r) @ basis (r, M); a following BN folds into ``dw``."""

    def batchnorm_absorber(self) -> nn.Module:
        return self.dw

    def _basis(self) -> torch.Tensor:
        raise NotImplementedError

    def _coefficients(self) -> nn.Parameter:
        raise NotImplementedError

    def dense_equivalent(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self._coefficients().detach().double().cpu().flatten(1) @ self._basis()  # (N, M)
        blueprint = self.dw.weight.detach().double().cpu().flatten(1)  # (N, T)
        weight = (rows[:, :, None] * blueprint[:, None, :]).reshape(len(rows), self.in_channels, *self.dw.kernel_size)
        return weight, self.dw.bias

    def calibration_blocker(self) -> str:
        return "not fitted: a BatchNorm inside the layer" if self.with_bn else ""

    @torch.no_grad()
    def transfer_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[float, float]:
        """Per filter the rank-1 SVD W[n] (M, T) ~ rows[n] (M, 1) @ blueprint[n] (1, T); the
        rows (N, M) are then written as coefficients @ basis (:meth:`_write_rows`)."""
        n, m, kh, kw = weight.shape
        left, blueprint, residual, total = low_rank_factors(weight.reshape(n, m, kh * kw), 1)
        write_parameter(self.dw.weight, blueprint)
        write_bias(self.dw, bias)
        return residual + self._write_rows(left[:, :, 0], blueprint), total

    def _write_rows(self, rows: torch.Tensor, blueprint: torch.Tensor) -> float:
        """Write the pointwise rows (N, M); the squared residual this adds to the transfer."""
        raise NotImplementedError

    @torch.no_grad()
    def calibration_fit(self, moments, settings, free_bias: bool) -> tuple[str, torch.Tensor | None]:
        """Per filter, alternating least squares on (pointwise row in the basis, blueprint,
        bias) from the transferred weights, each half step an exact ridge solve."""
        m, n = self.in_channels, self.out_channels
        taps = self.dw.kernel_size[0] * self.dw.kernel_size[1]
        basis = self._basis()  # (r, M)
        coefficients = self._coefficients().detach().double().cpu().flatten(1).clone()  # (N, r)
        blueprint = self.dw.weight.detach().double().cpu().reshape(n, taps)
        has_bias = self.dw.bias is not None or free_bias
        bias = self.dw.bias.detach().double().cpu() if self.dw.bias is not None else torch.zeros(n, dtype=torch.float64)
        d = m * taps
        g4 = moments.gram[:d, :d].reshape(m, taps, m, taps)
        sums = moments.gram[:d, d].reshape(m, taps)  # sum u
        c4 = moments.cross[:d].reshape(m, taps, n)
        count = float(moments.count)
        tap_pairs = g4.permute(1, 3, 0, 2).reshape(taps * taps, m * m)  # G[:, t, :, s] for every (t, s)
        chunk = max(1, (64 << 20) // (8 * m * m * taps))
        for _ in range(max(1, settings.als_iterations)):
            for start in range(0, n, chunk):
                rows = slice(start, min(n, start + chunk))
                bp = blueprint[rows]  # (n', T)
                # pointwise half: gram_c[n] = sum_{t,s} bp[n,t] bp[n,s] G[:, t, :, s], one product over tap pairs
                pairs = (bp[:, :, None] * bp[:, None, :]).reshape(len(bp), taps * taps)
                gram_c = (pairs @ tap_pairs).reshape(len(bp), m, m)
                gram_q = basis @ gram_c @ basis.mT  # (n', r, r)
                sum_q = torch.einsum("ct,nt->nc", sums, bp) @ basis.mT  # (n', r)
                rhs_q = torch.einsum("ctn,nt->nc", c4[:, :, rows], bp) @ basis.mT  # (n', r)
                solution = bordered_solve(gram_q, sum_q, rhs_q, moments.target_sum[rows], count, has_bias,
                                          settings.ridge)
                coefficients[rows], bias[rows] = solution[:, :-1], solution[:, -1]
                # blueprint half: gram_t[n] = sum_{c,d} s[n,c] s[n,d] G[c, :, d, :], s = coefficients @ basis
                s = coefficients[rows] @ basis  # (n', M)
                half = (s @ g4.reshape(m, taps * m * taps)).reshape(-1, taps, m, taps)
                gram_t = torch.einsum("ntds,nd->nts", half, s)  # (n', T, T)
                sum_t = torch.einsum("ct,nc->nt", sums, s)
                rhs_t = torch.einsum("ctn,nc->nt", c4[:, :, rows], s)
                solution = bordered_solve(gram_t, sum_t, rhs_t, moments.target_sum[rows], count, has_bias,
                                          settings.ridge)
                blueprint[rows], bias[rows] = solution[:, :-1], solution[:, -1]
        write_parameter(self.dw.weight, blueprint)
        if self.dw.bias is not None:
            write_parameter(self.dw.bias, bias)
        write_parameter(self._coefficients(), coefficients)
        return self._fit_method(settings), None if self.dw.bias is not None or not free_bias else bias


def _describe(layer, extra: str) -> str:
    return describe_spatial(layer, layer.dw, layer.dw.bias is not None, extra + (", with_bn=True" if layer.with_bn else ""))


class BSConvU2d(DirectSeparable, _Blueprint, nn.Module):
    r"""Unconstrained blueprint separable convolution: pointwise 1x1 then depthwise KxK.

    Submodules (as the official ``BSConvU``): ``pw`` = Conv2d(M, N, 1, bias=False),
    ``bn`` = BatchNorm2d(N, **bn_kwargs) only when ``with_bn``, ``dw`` =
    DepthwiseConv2d(N, N, K, stride, padding, dilation, bias, padding_mode) (an
    nn.Conv2d with groups=N), which carries the only bias. No activation inside.
    ``depthwise_backend`` picks its implementation (:class:`leanconv.layers.DepthwiseConv2d`).

    Shapes: (B, M, H, W) or (M, H, W) -> (B, N, Ho, Wo) or (N, Ho, Wo).
    Cost: H*W*M*N + Ho*Wo*N*K*K MACs per image (the 1x1 runs at input
    resolution, so with stride it costs more than DSC); parameters M*N + N*K*K
    (+ N), e.g. 10 -> 32, K=3: 640.

    Example::

        layer = leanconv.BSConvU2d(10, 32, 3, padding=1)
        y = layer(torch.randn(2, 10, 16, 16))            # (2, 32, 16, 16)
        assert sum(t.numel() for t in layer.parameters()) == 640
    """

    kind = "bsconv_u"
    kind_options = frozenset({"with_bn", "bn_kwargs", "depthwise_backend"})

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
        with_bn: bool = False,
        bn_kwargs: dict | None = None,
        *,
        depthwise_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = conv_arguments("BSConvU2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                                 padding_mode, device, dtype).factory
        self.in_channels, self.out_channels, self.with_bn = in_channels, out_channels, with_bn
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False, **factory)
        if with_bn:
            self.bn = nn.BatchNorm2d(out_channels, **(bn_kwargs or {}), **factory)
        self.dw = DepthwiseConv2d(
            out_channels, out_channels, kernel_size, stride, padding, dilation,
            bias=bias, padding_mode=padding_mode, backend=depthwise_backend, **factory,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_conv_input(input, self.in_channels, "BSConvU2d")
        if not self.with_bn and input.dim() == 4:
            out = self._direct(input, self.dw, self.pw, pointwise_first=True)
            if out is not None:
                return out
        return _run_unbatched_safe(self, input)

    # ------------------------------------------------- the layer protocol (protocol.py)
    def inference_form(self, *, merge_bsconv_s: bool = True) -> nn.Module:
        """Its BN folded into ``pw``."""
        if self.with_bn:
            fold_batchnorm(self.pw, self.bn)
            del self.bn
            self.with_bn = False
        return self.eval()

    def _basis(self) -> torch.Tensor:
        return torch.eye(self.in_channels, dtype=torch.float64)

    def _coefficients(self) -> nn.Parameter:
        return self.pw.weight

    def _write_rows(self, rows: torch.Tensor, blueprint: torch.Tensor) -> float:
        write_parameter(self.pw.weight, rows)
        return 0.0

    def _fit_method(self, settings) -> str:
        return f"alternating least squares per filter, {settings.als_iterations} iterations"

    def extra_repr(self) -> str:
        return _describe(self, "")


def bsconv_s_mid_channels(in_channels: int, p: float = 0.25, min_mid_channels: int = 4) -> int:
    """M' = min(M, max(min_mid_channels, ceil(p * M))), the official rule."""
    return min(in_channels, max(min_mid_channels, math.ceil(p * in_channels)))


class BSConvS2d(DirectSeparable, _Blueprint, nn.Module):
    r"""Subspace blueprint separable convolution: two pointwise 1x1 through a
    bottleneck of M' channels, then depthwise KxK.

    Submodules (as the official ``BSConvS``): ``pw1`` = Conv2d(M, M', 1, bias=False),
    ``bn1`` (with_bn), ``pw2`` = Conv2d(M', N, 1, bias=False), ``bn2`` (with_bn),
    ``dw`` = DepthwiseConv2d(N, N, K, ..., bias) (groups=N; ``depthwise_backend``
    picks its implementation). M' = min(M, max(min_mid_channels, ceil(p*M))). Train with :meth:`orthonormal_penalty` (or
    :func:`orthonormal_penalty` over a model) added to the loss.

    Shapes: (B, M, H, W) or (M, H, W) -> (B, N, Ho, Wo) or (N, Ho, Wo).
    Cost: H*W*M'*(M + N) + Ho*Wo*N*K*K MACs per image; parameters
    M*M' + M'*N + N*K*K (+ N).

    Example::

        layer = leanconv.BSConvS2d(64, 128, 3, padding=1)
        y = layer(torch.randn(2, 64, 8, 8))              # (2, 128, 8, 8)
        assert layer.pw1.out_channels == 16
    """

    kind = "bsconv_s"
    kind_options = frozenset({"p", "min_mid_channels", "with_bn", "bn_kwargs", "depthwise_backend"})

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
        p: float = 0.25,
        min_mid_channels: int = 4,
        with_bn: bool = False,
        bn_kwargs: dict | None = None,
        *,
        depthwise_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = conv_arguments("BSConvS2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                                 padding_mode, device, dtype).factory
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"BSConvS2d: p must be a number in (0, 1] (the bottleneck fraction M'/M), got {p!r}")
        if isinstance(min_mid_channels, bool) or not isinstance(min_mid_channels, int) or min_mid_channels < 1:
            raise ValueError(f"BSConvS2d: min_mid_channels must be a positive int, got {min_mid_channels!r}")
        mid = bsconv_s_mid_channels(in_channels, p, min_mid_channels)
        self.in_channels, self.out_channels, self.mid_channels = in_channels, out_channels, mid
        self.p, self.min_mid_channels, self.with_bn = p, min_mid_channels, with_bn
        self.pw1 = nn.Conv2d(in_channels, mid, 1, bias=False, **factory)
        if with_bn:
            self.bn1 = nn.BatchNorm2d(mid, **(bn_kwargs or {}), **factory)
        self.pw2 = nn.Conv2d(mid, out_channels, 1, bias=False, **factory)
        if with_bn:
            self.bn2 = nn.BatchNorm2d(out_channels, **(bn_kwargs or {}), **factory)
        self.dw = DepthwiseConv2d(
            out_channels, out_channels, kernel_size, stride, padding, dilation,
            bias=bias, padding_mode=padding_mode, backend=depthwise_backend, **factory,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_conv_input(input, self.in_channels, "BSConvS2d")
        if not self.with_bn and input.dim() == 4:
            out = self._direct(input, self.dw, self.pw2, pointwise_first=True, first_pointwise=self.pw1)
            if out is not None:
                return out
        return _run_unbatched_safe(self, input)

    def orthonormal_penalty(self) -> torch.Tensor:
        """||W W^T - I||_F for the (M', M) pw1 weight W (unscaled)."""
        w = self.pw1.weight[:, :, 0, 0]
        gram = w @ w.t()
        return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=w.device, dtype=w.dtype))

    # The official package's model mixin looks for this name; leanconv's training for the protocol's.
    _reg_loss = orthonormal_penalty
    regularization_loss = orthonormal_penalty

    # ------------------------------------------------- the layer protocol (protocol.py)
    def inference_form(self, *, merge_bsconv_s: bool = True) -> nn.Module:
        """With ``merge_bsconv_s``, :meth:`merged` (one pointwise conv); else ``bn1``/``bn2``
        folded into ``pw1``/``pw2``."""
        if merge_bsconv_s:
            return self.merged()
        if self.with_bn:
            fold_batchnorm(self.pw1, self.bn1)
            fold_batchnorm(self.pw2, self.bn2)
            del self.bn1, self.bn2
            self.with_bn = False
        return self.eval()

    def _basis(self) -> torch.Tensor:
        """pw1's rows (M', M), kept by calibration (orthonormal after the SVD transfer)."""
        return self.pw1.weight.detach().double().cpu().flatten(1)

    def _coefficients(self) -> nn.Parameter:
        return self.pw2.weight

    def summary_options(self) -> list[str]:
        return [f"mid={self.mid_channels}", *super().summary_options()]

    def _write_rows(self, rows: torch.Tensor, blueprint: torch.Tensor) -> float:
        """rows (N, M) ~ pw2 (N, M') @ pw1 (M', M), pw1 with orthonormal rows. The blueprint
        residual is orthogonal to every x (x) blueprint[n], so the two errors add up."""
        pw2, pw1, _, _ = low_rank_factors(rows[None], self.mid_channels, balanced=False)
        write_parameter(self.pw1.weight, pw1[0])
        write_parameter(self.pw2.weight, pw2[0])
        rows_error = (rows - pw2[0] @ pw1[0]).square().sum(1)
        return (rows_error * blueprint[:, 0].square().sum(1)).sum().item()

    def _fit_method(self, settings) -> str:
        return f"alternating least squares per filter (pw2, blueprint; pw1 kept), {settings.als_iterations} iterations"

    @torch.no_grad()
    def merged(self) -> BSConvU2d:
        """The same function as a BSConv-U with one biased pointwise conv (eval mode, BN
        statistics): W = S2 W2 S1 W1, b = S2 W2 t1 + t2 (S, t the BNs' scales and shifts).
        M*N weights instead of M'*(M+N): fewer passes over memory, more MACs where
        M' < M*N/(M+N)."""
        w1 = self.pw1.weight[:, :, 0, 0].to(torch.float64)
        b1 = torch.zeros(w1.shape[0], dtype=torch.float64, device=w1.device)
        if self.with_bn:
            scale, shift = batchnorm_affine(self.bn1)
            w1, b1 = w1 * scale[:, None], shift
        w2 = self.pw2.weight[:, :, 0, 0].to(torch.float64)
        weight, bias = w2 @ w1, w2 @ b1
        if self.with_bn:
            scale, shift = batchnorm_affine(self.bn2)
            weight, bias = weight * scale[:, None], bias * scale + shift
        dw = self.dw
        factory = {"device": dw.weight.device, "dtype": dw.weight.dtype}
        merged = BSConvU2d(
            self.in_channels, self.out_channels, dw.kernel_size, dw.stride, dw.padding, dw.dilation,
            bias=dw.bias is not None, padding_mode=dw.padding_mode, **factory,
        )
        merged.pw = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=True, **factory)
        merged.pw.weight.copy_(weight[:, :, None, None])
        merged.pw.bias.copy_(bias)
        merged.dw = dw
        return merged.eval()

    def extra_repr(self) -> str:
        extra = f", p={self.p}" if self.p != 0.25 else ""
        extra += f", min_mid_channels={self.min_mid_channels}" if self.min_mid_channels != 4 else ""
        return _describe(self, extra + f", mid_channels={self.mid_channels}")


def orthonormal_penalty(model: nn.Module, alpha: float = 0.1) -> torch.Tensor:
    """alpha * the sum of every leanconv layer's training-loss term in ``model``: for
    BSConvS2d ||W W^T - I||_F (the only kind with one).

    The value the official ``BSConvS_ModelRegLossMixin.reg_loss(alpha)`` returns;
    a zero tensor when the model has no BSConvS2d.

    Example::

        model = torch.nn.Sequential(leanconv.BSConvS2d(16, 32, 3))
        loss = task_loss + leanconv.orthonormal_penalty(model, alpha=0.1)
    """
    terms = [m.regularization_loss() for m in regularizers(model)]
    if not terms:
        try:
            reference = next(model.parameters())
            return reference.new_zeros(())
        except StopIteration:
            return torch.zeros(())
    return alpha * torch.stack(terms).sum()
