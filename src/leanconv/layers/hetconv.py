"""HetConv2d: exact heterogeneous-kernel convolution as an ``nn.Module``.

Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs",
CVPR 2019, https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import het_conv2d
from ..ops.autotune import (
    autotune_tracing,
    dense_macs,
    forward_backward,
    heuristic_choice,
    layer_memo_key,
    measured_choice,
    measuring_enabled,
    needs_autograd,
    rounds_for,
    stream_capturing,
    synchronizer,
    tuning_key,
)
from ..ops.backends import check_backend_name, choose_backend, measured_candidates, requested_backend
from ..ops.conv_geometry import (
    PADDING_MODES,
    check_conv_input,
    normalize_kernel_size,
    normalize_pair,
    normalize_padding,
    pad_for_mode,
)
from ..ops.hetconv_layout import (
    channel_permutation,
    check_hetconv_channels,
    check_layout,
    convert_layout,
    extract_hetconv_weights,
    materialize_dense_weight,
)
from ..ops.hetconv_fused import hetconv_fused_prepared, packing_supported, prepare_fused
from ..ops.hetconv_masked import hetconv_masked_prepared, prepare_masked

__all__ = ["HetConv2d"]


class HetConv2d(nn.Module):
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
    ``"split"``, ``"loop"``, ...); ``None`` defers to ``leanconv.use_backend`` and
    the ``LEANCONV_BACKEND`` environment variable. ``requested_backend`` shows
    the name in force and ``last_backend`` the implementation that ran last.

    Example::

        layer = leanconv.HetConv2d(64, 128, 3, padding=1, p=4)
        y = layer(torch.randn(8, 64, 32, 32))            # (8, 128, 32, 32)
        assert sum(t.numel() for t in layer.parameters()) == 128 * (16 * 9 + 48) + 128
    """

    __constants__ = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "p", "layout"]

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
        check_hetconv_channels(in_channels, out_channels, p)
        check_layout(layout)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = normalize_kernel_size(kernel_size)
        self.stride = normalize_pair(stride, "stride")
        self.dilation = normalize_pair(dilation, "dilation")
        self._padding_pair = normalize_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding if isinstance(padding, str) else self._padding_pair
        self.padding_mode = padding_mode
        self.p = p
        self.layout = layout
        self._backend = check_backend_name(backend)
        self.last_backend: str | None = None

        factory = {"device": device, "dtype": dtype}
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

    @property
    def backend(self) -> str | None:
        """The ``backend=`` argument (None: context manager, environment, auto)."""
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend = check_backend_name(name)

    @property
    def requested_backend(self) -> str:
        """The backend name in force now: argument, context, environment or "auto"."""
        return requested_backend(self._backend)

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
        return s

    # ---------------------------------------------------------------- forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_conv_input(input, self.in_channels, type(self).__name__)
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        x, padding = pad_for_mode(x, self._padding_pair, self.padding_mode)
        requested = requested_backend(self._backend)
        needs_grad = needs_autograd(x, self)
        if requested == "auto" and x.device.type in ("cpu", "cuda"):
            name = self._auto_measured(x, padding, needs_grad)
        else:
            name = choose_backend(requested, x, self.weight, self.p)
        self.__dict__["last_backend"] = name  # a plain attribute; skips nn.Module.__setattr__ on the hot path
        out = self._run(name, x, padding, needs_grad)
        return out.squeeze(0) if unbatched else out

    def _auto_measured(self, x: torch.Tensor, padding: tuple[int, int], needs_grad: bool) -> str:
        """``auto`` on the CPU or a CUDA device: measured or by rule
        (:mod:`leanconv.ops.autotune`), remembered on the layer per input setting
        so that a repeated setting costs one dictionary lookup (never while
        tracing or compiling)."""
        if autotune_tracing():
            return choose_backend("auto", x, self.weight, self.p)
        memo_key = layer_memo_key(x, needs_grad, padding)
        memo = self.__dict__.setdefault("_auto_memo", {})
        name = memo.get(memo_key)
        if name is None:
            if measuring_enabled(x, self.weight, self.p, self.stride, padding, self.dilation):
                name = self._measured_backend(x, padding, needs_grad)
            else:
                name = self._rule_choice(x)
            if not stream_capturing(x):  # a choice made without measuring only for the capture
                memo[memo_key] = name
        return name

    def _run(self, name: str, x: torch.Tensor, padding: tuple[int, int], needs_grad: bool) -> torch.Tensor:
        """Run backend ``name``; without autograd, from weights prepared once (see
        :meth:`prepared_weights`) where the backend has any to prepare."""
        if not needs_grad and self.p > 1:
            if name in ("fused", "packed"):
                packed = name == "packed" and packing_supported(x) and x.dtype == self.weight.dtype
                prepared = self.prepared_weights("packed" if packed else "fused", x, padding)
                return hetconv_fused_prepared(x, prepared, self.bias, self.kernel_size, self.stride, padding, self.dilation)
            if name == "masked":
                channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                packed = channels_last and packing_supported(x) and x.dtype == self.weight.dtype
                prepared = self.prepared_weights("masked_packed" if packed else "masked", x, padding)
                return hetconv_masked_prepared(x, prepared, self.bias, self.kernel_size, self.stride, padding, self.dilation)
            if name == "reference":
                return F.conv2d(x, self.prepared_weights("reference", x, padding), self.bias, self.stride, padding, self.dilation)
            if name == "triton":
                from ..ops.hetconv_triton import hetconv_triton_packed  # imports Triton: only where it runs

                wk, wp = self.prepared_weights("triton", x, padding)
                return hetconv_triton_packed(
                    x, wk, wp, self.bias, self.stride, padding, self.dilation, self.p, self.kernel_size, self.layout,
                )
        return het_conv2d(
            x, self.weight, self.pointwise_weight, self.bias, self.stride, padding, self.dilation,
            p=self.p, layout=self.layout, backend=name,
        )

    def _rule_choice(self, x: torch.Tensor) -> str:
        """``auto`` without measuring: the CPU heuristic, or the device rule of ``backends``."""
        if x.device.type == "cpu":
            return heuristic_choice(x, self.weight, self.p)
        return choose_backend("auto", x, self.weight, self.p)

    def _measured_backend(self, x: torch.Tensor, padding: tuple[int, int], needs_grad: bool) -> str:
        """The measuring ``auto`` (:mod:`leanconv.ops.autotune`): time the exact
        candidates (:func:`leanconv.ops.backends.measured_candidates`; on CUDA
        ``triton`` among them) on this input once per setting; with autograd,
        forward and backward on detached copies (the caller's tensors and
        gradients are untouched)."""
        key = tuning_key(
            x, self.weight, self.p, self.layout, self.stride, padding, self.dilation, self.bias is not None, needs_grad
        )
        names = measured_candidates(x, needs_grad)
        if needs_grad:
            def candidate(name):
                return forward_backward(
                    lambda x, weight, pointwise, bias: het_conv2d(
                        x, weight, pointwise, bias, self.stride, padding, self.dilation,
                        p=self.p, layout=self.layout, backend=name,
                    ),
                    (x, self.weight, self.pointwise_weight, self.bias),
                )
        else:
            def candidate(name):
                def run():
                    with torch.no_grad():
                        self._run(name, x, padding, needs_grad=False)
                return run

        macs = dense_macs(x, self.weight, self.p, self.stride, padding, self.dilation)
        choice = measured_choice(
            key, {name: candidate(name) for name in names}, rounds=rounds_for(macs),
            prefer=self._rule_choice(x), synchronize=synchronizer(x),
        )
        # Keep only the prepared weights of the winner (the losers' were built to be timed).
        prepared = self.__dict__.get("_prepared", {})
        for kind in [k for k in prepared if k != choice and not k.startswith(choice + "_")]:
            del prepared[kind]
        return choice

    def __getstate__(self):
        # Copies and pickles leave the caches behind (oneDNN's packed weights
        # cannot be copied; a copy rebuilds what it needs on its first call).
        state = self.__dict__.copy()
        state.pop("_prepared", None)
        state.pop("_auto_memo", None)
        return state

    def prepared_weights(self, kind: str, x: torch.Tensor, padding: tuple[int, int]):
        """Weight-derived tensors for inference, built once and reused until the
        parameters change (their ``_version`` counters, storage, device or dtype;
        an optimizer step, ``load_state_dict`` or ``.to()`` all rebuild them).

        ``kind``: ``"reference"`` (the dense (N, M, kh, kw) weight), ``"masked"``
        or ``"masked_packed"`` (:class:`leanconv.ops.hetconv_masked.MaskedWeights`), ``"fused"``
        or ``"packed"`` (:class:`leanconv.ops.hetconv_fused.FusedWeights`; packed
        weights are also keyed on the input's shape, which oneDNN packs for),
        ``"triton"`` (the Triton kernels' (wk, wp) layout, :func:`leanconv.ops.hetconv_triton.pack_weights`).
        Only for calls without autograd: under autograd backends rebuild these
        from the parameters on every call, so gradients flow to them.
        """
        weight, pointwise = self._parameters["weight"], self._parameters["pointwise_weight"]
        key = (
            weight._version, weight.data_ptr(), pointwise._version, pointwise.data_ptr(), weight.dtype,
            weight.is_cpu, torch.is_inference_mode_enabled(), tuple(x.shape) if kind.endswith("packed") else None,
        )
        cache = self.__dict__.setdefault("_prepared", {})
        hit = cache.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            if kind == "reference":
                value = materialize_dense_weight(self.weight, self.pointwise_weight, self.p, self.layout)
            elif kind in ("masked", "masked_packed"):
                value = prepare_masked(
                    self.weight, self.pointwise_weight, self.p, self.layout, packed=kind == "masked_packed",
                    padding=padding, stride=self.stride, dilation=self.dilation, input_size=tuple(x.shape),
                )
            elif kind == "triton":
                from ..ops.hetconv_triton import pack_weights

                value = pack_weights(self.weight, self.pointwise_weight, self.p, self.layout)
            else:
                value = prepare_fused(
                    self.weight, self.pointwise_weight, self.p, self.layout, packed=kind == "packed",
                    padding=padding, stride=self.stride, dilation=self.dilation, input_size=tuple(x.shape),
                )
        cache[kind] = (key, value)
        return value

    # ------------------------------------------------------- weight utilities
    def dense_weight(self) -> torch.Tensor:
        """The (N, M, kh, kw) weight of the equivalent ordinary convolution."""
        return materialize_dense_weight(self.weight, self.pointwise_weight, self.p, self.layout)

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (dense weight, same arguments)."""
        conv = nn.Conv2d(
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
