"""HetConv2d: exact heterogeneous-kernel convolution as an ``nn.Module``.

Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs",
CVPR 2019, https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.conv_geometry import HetConvGeometry, normalize_kernel_size, normalize_pair, normalize_padding
from ..ops.hetconv_layout import (
    channel_permutation,
    check_hetconv_channels,
    check_layout,
    convert_layout,
    extract_hetconv_weights,
    materialize_dense_weight,
    pointwise_channel_index,
)
from ..ops.least_squares import ridge_solve
from ..ops.low_rank import CHUNK_BYTES
from ._common import DispatchedLayer, conv_arguments
from .protocol import (
    LeanConvLayer, fold_conv_output_affine_, hetconv_mac_ratio, hetconv_macs_per_output, hetconv_paper_macs, write_bias,
    write_parameter,
)

__all__ = ["HetConv2d"]


class Conv2dReLU(nn.Conv2d):
    """``nn.Conv2d`` followed by ``ReLU``, as :func:`leanconv.fuse` makes of an
    ``nn.Conv2d`` -> ``nn.ReLU`` pair (the same parameters and ``state_dict``): the
    convolution, then the ReLU in place on its output. (A HetConv2d gets
    ``activation="relu"`` instead; its ``direct`` kernel applies it in registers.)
    Why not oneDNN's ReLU post-op: docs/performance_notes.md."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.relu_(super().forward(input))


class HetConv2d(DispatchedLayer, LeanConvLayer, nn.Module):
    r"""Exact HetConv: each filter has M/P KxK kernels and M - M/P 1x1 kernels.

    The layer equals one KxK convolution whose (N, M, K, K) weight is zero except
    on each filter's KxK channels and at the centre tap of its other channels
    (see :mod:`leanconv.ops.hetconv_layout` for the ``blocked`` and ``shifted``
    placements). ``p=1`` is a standard convolution.

    Parameters (exactly HetConv's weights, nothing stored as zeros):

    * ``weight``: (N, M/P, kh, kw), ``weight[n, j]`` is filter n's KxK kernel on
      input channel ``kxk_channel_index(M, N, P, layout)[n, j]``;
    * ``pointwise_weight``: (N, M - M/P), filter n's 1x1 weights on its other
      channels, in increasing channel order;
    * ``bias``: (N,) or None.

    In total N*(M/P*kh*kw + M - M/P) (+N) parameters. All are initialised like
    ``nn.Conv2d``: uniform in +-1/sqrt(fan_in) with fan_in = M/P*kh*kw + M - M/P,
    the real number of inputs of one filter.

    Shapes: input (B, M, H, W) or (M, H, W); output (B, N, Ho, Wo) or (N, Ho, Wo)
    with PyTorch's Ho = floor((H + 2*pad - dil*(kh-1) - 1)/stride) + 1.

    Cost: Ho*Wo*N*(M/P*kh*kw + M - M/P) multiply-accumulates per image, i.e.
    R(P) = 1/P + (1 - 1/P)/(kh*kw) of the standard convolution (FLOPs = 2 x MACs).

    The implementation is chosen by ``backend`` (``"auto"``, ``"reference"``,
    ``"split"``, ``"triton"`` or a registered backend); ``None`` defers to
    ``leanconv.use_backend``, ``leanconv.set_backend`` and the ``LEANCONV_BACKEND``
    environment variable (:mod:`leanconv.config`); the one dispatch path is
    :mod:`leanconv.ops.dispatch`. ``requested_backend`` shows the name in force
    and ``last_backend`` the backend that ran last.

    Example::

        layer = leanconv.HetConv2d(64, 128, 3, padding=1, p=4)
        y = layer(torch.randn(8, 64, 32, 32))            # (8, 128, 32, 32)
        assert sum(t.numel() for t in layer.parameters()) == 128 * (16 * 9 + 48) + 128
    """

    __constants__ = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "p", "layout"]
    activation: str | None = None  # the output activation fused into the layer (leanconv.fuse)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        p: int,
        layout: str = "blocked",
        backend: str | None = None,
        groups: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(
                f"HetConv2d supports only groups=1 (its P groups of KxK kernels are set by p), got groups={groups!r}"
            )
        arguments = conv_arguments("HetConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                                   padding_mode, device, dtype, odd_kernel=True)
        check_hetconv_channels(in_channels, out_channels, p)
        check_layout(layout)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = arguments.kernel_size, arguments.stride, arguments.dilation
        self._padding_pair, self.padding = arguments.padding_pair, arguments.padding
        self.padding_mode = padding_mode
        self.p = p
        self.layout = layout
        self._backend = self._check_backend(backend)
        explicit = padding_mode != "zeros" and self._padding_pair != (0, 0)
        self._mode_padding = (self._padding_pair, padding_mode) if explicit else None
        self._geometry = HetConvGeometry(
            in_channels, out_channels, self.kernel_size, self.stride,
            (0, 0) if explicit else self._padding_pair, self.dilation, p, layout,
        )

        factory = arguments.factory
        per_group = in_channels // p
        self.weight = nn.Parameter(torch.empty(out_channels, per_group, *self.kernel_size, **factory))
        self.pointwise_weight = nn.Parameter(torch.empty(out_channels, in_channels - per_group, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ----------------------------------------------------------------- set-up
    @property
    def fan_in(self) -> int:
        """Inputs of one filter: M/P*kh*kw + M - M/P."""
        per_group = self.in_channels // self.p
        return per_group * self.kernel_size[0] * self.kernel_size[1] + self.in_channels - per_group

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation with HetConv's real fan-in."""
        bound = 1.0 / math.sqrt(self.fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.pointwise_weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", p={self.p}"
        if self.layout != "blocked":
            s += f", layout={self.layout!r}"
        if self._backend is not None:
            s += f", backend={self._backend!r}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s

    def set_activation(self, activation: str | None) -> None:
        """Apply ``activation`` (``"relu"``, or None for none) to the layer's output:
        inside the kernel where the backend can (``direct``), after it otherwise.
        ``leanconv.fuse`` sets it when a ReLU module follows the layer."""
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        self._geometry = self._geometry._replace(activation=activation)

    # ------------------------------------------------- the layer protocol (protocol.py)
    kind = "hetconv"
    kind_options = frozenset({"p", "layout", "backend"})
    kind_required = {"p": "the HetConv part P"}
    kind_divisor, kind_divides = ("p",), ("in_channels", "out_channels")
    counting_backend = "reference"  # a shape-only pass builds and measures nothing

    def mac_stages(self) -> list[tuple[nn.Module, int]]:
        return [(self, hetconv_macs_per_output(self.in_channels, math.prod(self.kernel_size), self.p))]

    def count_macs(self, output: torch.Tensor, convention: str) -> tuple[int, str]:
        """``exact``: Ho*Wo*N*(M/P*K*K + M - M/P) per image; ``paper``: R(P) times the
        standard convolution's MACs plus one bias add per output (the paper's tables)."""
        kernel_area = math.prod(self.kernel_size)
        ratio = hetconv_mac_ratio(self.p, kernel_area)
        if convention == "exact":
            macs = output.numel() * hetconv_macs_per_output(self.in_channels, kernel_area, self.p)
        else:
            macs = hetconv_paper_macs(output.numel(), self.in_channels, kernel_area, self.p)
        return macs, f"p={self.p}, R(P)={float(ratio):.4f}"

    def batchnorm_absorber(self) -> nn.Module:
        return self

    def summary_options(self) -> list[str]:
        return [f"p={self.p}"] + ([f"layout={self.layout}"] if self.layout != "blocked" else [])

    @torch.no_grad()
    def fold_output_affine_(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Both ``weight`` and ``pointwise_weight`` of filter n scaled by ``scale[n]``: the
        layer stays an exact HetConv with the same P and layout."""
        pointwise = self.pointwise_weight
        pointwise.copy_((pointwise.to(torch.float64) * scale.view(-1, 1)).to(pointwise.dtype))
        fold_conv_output_affine_(self, scale, shift)  # weight and bias, as an nn.Conv2d's

    def fuse_activation(self, activation: str) -> bool:
        if self.activation is not None:
            return False
        self.set_activation(activation)
        return True

    def export_form(self, *, hetconv_form: str = "split") -> nn.Module:
        """``split``: :class:`~leanconv.layers.hetconv_export.HetConvExportForm` (grouped KxK
        conv + 1x1 conv + add); ``dense`` (and P = 1): :meth:`to_conv2d`."""
        from .hetconv_export import HetConvExportForm

        if self.p == 1 or hetconv_form == "dense":
            return self.to_conv2d().eval()
        return HetConvExportForm(self)

    def dense_equivalent(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.dense_weight(), self.bias

    @torch.no_grad()
    def transfer_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[float, float]:
        """Each filter keeps W's KxK kernels on its own channels and W's centre taps elsewhere:
        exact copies (no arithmetic); the residual is the off-centre energy of the 1x1 channels."""
        kxk, pointwise = extract_hetconv_weights(weight, self.p, self.layout, check_structure=False)
        write_parameter(self.weight, kxk)
        write_parameter(self.pointwise_weight, pointwise)
        write_bias(self, bias)
        n, m, kh, kw = weight.shape
        on_pointwise = torch.zeros(n, m, dtype=torch.bool, device=weight.device)
        on_pointwise.scatter_(1, pointwise_channel_index(m, n, self.p, self.layout, weight.device), True)
        residual = total = 0.0
        step = max(1, CHUNK_BYTES // (8 * m * kh * kw))
        for start in range(0, n, step):
            energy = weight[start : start + step].to(torch.float64).square()
            off_centre = energy.sum((2, 3)) - energy[:, :, kh // 2, kw // 2]
            residual += off_centre[on_pointwise[start : start + step]].sum().item()
            total += energy.sum().item()
        return residual, total

    def calibration_blocker(self) -> str:
        return ""

    @torch.no_grad()
    def calibration_fit(self, moments, settings, free_bias: bool) -> tuple[str, torch.Tensor | None]:
        """HetConv's output is linear in all its weights: per filter, ridge least squares
        over the patch entries its pattern keeps (its group's KxK taps, the centre tap of
        every other channel) and the bias; filters with one pattern share a factorisation."""
        n = self.out_channels
        with_bias = self.bias is not None or free_bias
        ones = torch.ones_like(self.weight, dtype=torch.float64, device="cpu")
        ones_pw = torch.ones_like(self.pointwise_weight, dtype=torch.float64, device="cpu")
        pattern = materialize_dense_weight(ones, ones_pw, self.p, self.layout).reshape(n, -1) != 0
        pattern = torch.cat([pattern, torch.full((n, 1), with_bias)], 1)  # (N, D+1)
        weight = torch.zeros(n, pattern.shape[1], dtype=torch.float64)
        unique, which = torch.unique(pattern, dim=0, return_inverse=True)
        for u, mask in enumerate(unique):
            filters = (which == u).nonzero().flatten()
            index = mask.nonzero().flatten()
            rhs = moments.cross[index][:, filters]
            weight[filters[:, None], index[None, :]] = ridge_solve(moments.gram[index][:, index], rhs, settings.ridge,
                                                                   with_bias).mT
        dense = weight[:, :-1].reshape(n, self.in_channels, *self.kernel_size)
        kxk, pointwise = extract_hetconv_weights(dense, self.p, self.layout, check_structure=False)
        write_parameter(self.weight, kxk)
        write_parameter(self.pointwise_weight, pointwise)
        if self.bias is not None:
            write_parameter(self.bias, weight[:, -1])
        return "ridge least squares per filter", None if self.bias is not None or not free_bias else weight[:, -1]

    # ---------------------------------------------------------------- forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        dispatcher = self.__dict__.get("_dispatcher") or self._get_dispatcher()
        return dispatcher(
            input, (params["weight"], params["pointwise_weight"]), params["bias"], self._geometry, self._backend,
            self._mode_padding,
        )

    # ------------------------------------------------------- weight utilities
    def dense_weight(self) -> torch.Tensor:
        """The (N, M, kh, kw) weight of the equivalent ordinary convolution."""
        return materialize_dense_weight(self.weight, self.pointwise_weight, self.p, self.layout)

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (dense weight, same arguments;
        a :class:`Conv2dReLU` where the layer's ``activation`` is ``"relu"``)."""
        conv = (Conv2dReLU if self.activation == "relu" else nn.Conv2d)(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def _same_arguments(self, **overrides) -> dict:
        arguments = dict(
            in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
            padding_mode=self.padding_mode, p=self.p, layout=self.layout, backend=self._backend,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        arguments.update(overrides)
        return arguments

    def to_layout(self, layout: str) -> "HetConv2d":
        """The same layer re-expressed in ``layout``, up to channel permutations.

        With sigma_C(c) = (c mod P)*(C/P) + c // P, converting a shifted layer S
        to a blocked layer B gives ``B(x[:, inv(sigma_M)])[:, sigma_N] == S(x)``,
        i.e. B's input channel sigma_M(c) is S's channel c and B's output
        channel sigma_N(n) is S's filter n (blocked -> shifted is the inverse).
        In a network, BN, ReLU, pooling, residual adds and FC layers absorb the
        permutation; the bias moves with its filter.
        """
        check_layout(layout)
        with torch.no_grad():
            weight, pointwise = convert_layout(self.weight, self.pointwise_weight, self.p, self.layout, layout)
            converted = HetConv2d(**self._same_arguments(layout=layout))
            converted.set_activation(self.activation)  # an elementwise ReLU commutes with the permutation
            converted.weight.copy_(weight)
            converted.pointwise_weight.copy_(pointwise)
            if self.bias is not None:
                sigma = channel_permutation(self.out_channels, self.p, self.bias.device)
                if self.layout == "shifted":
                    converted.bias[sigma] = self.bias
                else:
                    converted.bias.copy_(self.bias[sigma])
        return converted.train(self.training)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        *,
        p: int,
        layout: str = "blocked",
        backend: str | None = None,
        atol: float = 0.0,
    ) -> "HetConv2d":
        """Build a HetConv2d from a dense (N, M, kh, kw) weight that already has
        HetConv's zero pattern; a ValueError names the first violation (beyond
        ``atol``) instead of silently dropping weights."""
        out_channels, in_channels, kh, kw = weight.shape
        kxk, pointwise = extract_hetconv_weights(weight.detach(), p, layout, atol=atol)
        layer = cls(
            in_channels, out_channels, (kh, kw), stride, padding, dilation, bias is not None, padding_mode,
            p=p, layout=layout, backend=backend, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(kxk)
            layer.pointwise_weight.copy_(pointwise)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_approximate(
        cls,
        gwc_weight: torch.Tensor,
        pwc_weight: torch.Tensor,
        gwc_bias: torch.Tensor | None = None,
        pwc_bias: torch.Tensor | None = None,
        stride=1,
        padding=None,
        dilation=1,
        padding_mode: str = "zeros",
        *,
        backend: str | None = None,
    ) -> "HetConv2d":
        """Import the public "approximate" form: grouped KxK conv + dense 1x1 conv.

        The approximate form computes ``conv(x, gwc_weight, groups=P, padding)
        + conv(x, pwc_weight, padding=padding - centre)`` with ``gwc_weight``
        (N, M/P, K, K) and ``pwc_weight`` (N, M, 1, 1) (or (N, M)), both with the
        same ``stride``; centre = dilation*(K-1)//2, so with the usual
        ``padding=centre`` (the default) the 1x1 branch is unpadded. Its 1x1
        weights on a filter's own KxK channels are redundant: they are folded
        into the centre taps of those KxK kernels. The result is an exact,
        blocked-layout HetConv2d with P = M / gwc_weight.shape[1] whose outputs
        equal the approximate form's (to rounding), with N*M/P fewer parameters.
        """
        if gwc_weight.dim() != 4:
            raise ValueError(f"gwc_weight must be (N, M/P, K, K), got shape {tuple(gwc_weight.shape)}")
        if pwc_weight.dim() == 4:
            if pwc_weight.shape[2:] != (1, 1):
                raise ValueError(f"pwc_weight must be (N, M, 1, 1) or (N, M), got shape {tuple(pwc_weight.shape)}")
            pwc_weight = pwc_weight[:, :, 0, 0]
        if pwc_weight.dim() != 2 or pwc_weight.shape[0] != gwc_weight.shape[0]:
            raise ValueError(
                f"pwc_weight must be (N, M, 1, 1) or (N, M) with N={gwc_weight.shape[0]}, got {tuple(pwc_weight.shape)}"
            )
        out_channels, per_group, kh, kw = gwc_weight.shape
        in_channels = pwc_weight.shape[1]
        if in_channels % per_group:
            raise ValueError(
                f"pwc_weight has M={in_channels} input channels, not a multiple of gwc_weight.shape[1]={per_group}"
            )
        p = in_channels // per_group
        kernel_size = normalize_kernel_size((kh, kw))
        dilation_pair = normalize_pair(dilation, "dilation")
        centre = (dilation_pair[0] * (kh - 1) // 2, dilation_pair[1] * (kw - 1) // 2)
        padding = centre if padding is None else padding
        padding_pair = normalize_padding(padding, kernel_size, normalize_pair(stride, "stride"), dilation_pair)
        if padding_pair[0] < centre[0] or padding_pair[1] < centre[1]:
            raise ValueError(
                f"padding={padding!r} is smaller than the centre offset {centre}: the approximate form's 1x1 branch "
                "would need negative padding to align with the KxK windows"
            )
        if padding_pair != centre and padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={padding_mode!r} with padding={padding!r} != centre offset {centre}: the approximate "
                "form's 1x1 branch is zero-padded there, which this layer cannot reproduce"
            )
        layer = cls(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            gwc_bias is not None or pwc_bias is not None, padding_mode, p=p, layout="blocked", backend=backend,
            device=gwc_weight.device, dtype=gwc_weight.dtype,
        )
        with torch.no_grad():
            dense = materialize_dense_weight(
                gwc_weight, gwc_weight.new_zeros(out_channels, in_channels - per_group), p, "blocked"
            )
            dense[:, :, kh // 2, kw // 2] += pwc_weight
            weight, pointwise = extract_hetconv_weights(dense, p, "blocked")
            layer.weight.copy_(weight)
            layer.pointwise_weight.copy_(pointwise)
            if layer.bias is not None:
                layer.bias.zero_()
                for b in (gwc_bias, pwc_bias):
                    if b is not None:
                        layer.bias.add_(b)
        return layer
