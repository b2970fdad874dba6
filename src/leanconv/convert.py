"""Model conversion: swap a network's dense convolutions for HetConv, DSC,
BSConv-U/S or GWC+PWC, and report what that saves.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.
BSConv: Haase & Amthor, CVPR 2020, https://arxiv.org/abs/2003.13549.

``convert(model, kind, **options)`` walks ``named_children()`` recursively and
replaces every *eligible* convolution, building the new layer with
:func:`leanconv.layers.make_conv` from the old layer's hyper-parameters
(channels, kernel, stride, padding, dilation, padding_mode, bias or not),
device and dtype, and keeping its train/eval flag. Eligible means:

* the module's type is exactly ``nn.Conv2d`` (subclasses, e.g. "same"-padding
  or weight-standardised variants whose ``forward`` differs, are skipped with a
  reason unless ``convert_subclasses=True``);
* ``groups == 1`` (grouped and depthwise convolutions are already cheap);
* an odd kernel larger than 1 in both dimensions (1x1 convolutions have
  nothing to separate; even kernels have no centre tap);
* not the stem (with ``skip_stem=True``), matched by ``include`` and not by
  ``exclude``, and, for HetConv/GWC+PWC, with channels that the part P/the
  groups divide (see ``p_policy``).

Everything else is left alone and listed in the report with its reason. The
inside of leanconv's own layers is never touched.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .layers import (
    BSConvS2d,
    BSConvU2d,
    CONV_KINDS,
    DSConv2d,
    GWPWConv2d,
    HetConv2d,
    SeedHetConv2d,
    check_kind_options,
    make_conv,
)
from .ops.conv_geometry import conv_output_size, normalize_padding
from .ops.hetconv_layout import extract_hetconv_weights

__all__ = [
    "ConversionReport",
    "ReplacedLayer",
    "SkippedLayer",
    "LEANCONV_LAYERS",
    "convert",
    "conv_macs",
    "load_converted",
    "save_converted",
]

# Layers whose inside convert() never enters.
LEANCONV_LAYERS: tuple[type[nn.Module], ...] = (HetConv2d, DSConv2d, GWPWConv2d, BSConvU2d, BSConvS2d, SeedHetConv2d)

P_POLICIES = ("skip", "largest")

_CONVERT_OPTIONS = frozenset(
    {
        "inplace", "include", "exclude", "skip_stem", "transfer_weights", "p_policy", "convert_subclasses",
        "input_size", "return_report", "verbose",
    }
)


# ----------------------------------------------------------------------------- report
@dataclass
class ReplacedLayer:
    """One replaced convolution. MACs are per image (FLOPs = 2 x MACs) and
    None when no ``input_size`` was given; ``calls`` counts how often the
    layer ran in the shape pass (a shared layer's MACs count every call)."""

    name: str
    before: str
    after: str
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""
    transfer_error: float | None = None


@dataclass
class SkippedLayer:
    """One convolution left alone, and why."""

    name: str
    module: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did. ``str(report)`` is the printed table.

    Totals: ``params_before``/``params_after`` of the whole model; MACs of the
    replaced layers (``replaced_macs_*``) when a shape pass ran, and of the
    whole model (``model_macs_*``, via :mod:`leanconv.accounting` when it is
    available) - all multiply-accumulates per image, FLOPs = 2 x MACs.
    """

    kind: str
    options: dict
    replaced: list[ReplacedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    input_size: tuple[int, ...] | None = None
    model_macs_before: int | None = None
    model_macs_after: int | None = None

    @property
    def replaced_params_before(self) -> int:
        return sum(r.params_before for r in self.replaced)

    @property
    def replaced_params_after(self) -> int:
        return sum(r.params_after for r in self.replaced)

    @property
    def replaced_macs_before(self) -> int | None:
        values = [r.macs_before for r in self.replaced]
        return None if not values or None in values else sum(values)

    @property
    def replaced_macs_after(self) -> int | None:
        values = [r.macs_after for r in self.replaced]
        return None if not values or None in values else sum(values)

    def to_dict(self) -> dict:
        """Plain data (for ``--json`` and checkpoints)."""
        return {
            "kind": self.kind,
            "options": {k: v for k, v in self.options.items()},
            "input_size": None if self.input_size is None else list(self.input_size),
            "mac_unit": "multiply-accumulates per image (FLOPs = 2 x MACs)",
            "replaced": [r.__dict__ | {"aliases": list(r.aliases)} for r in self.replaced],
            "skipped": [s.__dict__ for s in self.skipped],
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "replaced_params_before": self.replaced_params_before,
                "replaced_params_after": self.replaced_params_after,
                "replaced_macs_before": self.replaced_macs_before,
                "replaced_macs_after": self.replaced_macs_after,
                "model_macs_before": self.model_macs_before,
                "model_macs_after": self.model_macs_after,
            },
        }

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        lines = [f"leanconv.convert: kind={self.kind!r}" + (f" ({options})" if options else "")]
        size = "" if self.input_size is None else f", input {tuple(self.input_size)}"
        lines.append(f"MACs = multiply-accumulates per image (FLOPs = 2 x MACs){size}")

        def fmt(value) -> str:
            return "-" if value is None else f"{value:,}"

        if self.replaced:
            width = max(len(r.name) for r in self.replaced)
            width = max(width, 5)
            lines.append("")
            lines.append(f"replaced ({len(self.replaced)}):")
            lines.append(
                f"  {'layer':<{width}}  {'params before':>14}  {'params after':>13}  {'MACs before':>14}  {'MACs after':>14}  new layer"
            )
            for r in self.replaced:
                extra = f"  [{r.note}]" if r.note else ""
                if r.aliases:
                    extra += f"  (also {', '.join(r.aliases)})"
                if r.transfer_error is not None:
                    extra += f"  (weight transfer rel. error {r.transfer_error:.3g})"
                lines.append(
                    f"  {r.name:<{width}}  {r.params_before:>14,}  {r.params_after:>13,}  {fmt(r.macs_before):>14}  "
                    f"{fmt(r.macs_after):>14}  {r.after}{extra}"
                )
        else:
            lines.append("")
            lines.append("replaced: none")
        if self.skipped:
            width = max(max(len(s.name) for s in self.skipped), 5)
            lines.append("")
            lines.append(f"left alone ({len(self.skipped)}):")
            for s in self.skipped:
                lines.append(f"  {s.name:<{width}}  {s.module}: {s.reason}")
        lines.append("")
        lines.append("totals:")

        def ratio(after, before) -> str:
            return "" if not before or after is None or before is None else f"  ({after / before:.1%} of before)"

        lines.append(
            f"  replaced layers: params {self.replaced_params_before:,} -> {self.replaced_params_after:,}"
            + ratio(self.replaced_params_after, self.replaced_params_before)
        )
        if self.replaced_macs_before is not None:
            lines.append(
                f"  replaced layers: MACs {self.replaced_macs_before:,} -> {self.replaced_macs_after:,}"
                + ratio(self.replaced_macs_after, self.replaced_macs_before)
            )
        lines.append(
            f"  model: params {self.params_before:,} -> {self.params_after:,}"
            + ratio(self.params_after, self.params_before)
        )
        if self.model_macs_before is not None:
            lines.append(
                f"  model: MACs {self.model_macs_before:,} -> {self.model_macs_after:,}"
                + ratio(self.model_macs_after, self.model_macs_before)
            )
        elif self.input_size is None:
            lines.append("  (MACs need input_size=(C, H, W) for a shape pass)")
        return "\n".join(lines)


# ------------------------------------------------------------------------- cost helpers
def _count_params(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters())


def _out_hw(conv, hw: tuple[int, int]) -> tuple[int, int]:
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    padding = getattr(conv, "_padding_pair", None) or normalize_padding(conv.padding, kernel, stride, dilation)
    return tuple(conv_output_size(hw[i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))


def conv_macs(module: nn.Module, hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Multiply-accumulates of one call of a convolution layer on an input of
    spatial size ``hw`` (per image; FLOPs = 2 x MACs), and its output size.

    Knows ``nn.Conv2d`` (Ho*Wo*N*M/groups*kh*kw), ``HetConv2d``
    (Ho*Wo*N*(M/P*kh*kw + M - M/P)), ``SeedHetConv2d`` (its two branches) and the
    separable layers (their convolutions in order). Biases and BN are not counted.
    """
    if isinstance(module, nn.Conv2d):
        out = _out_hw(module, hw)
        kh, kw = module.kernel_size
        return out[0] * out[1] * module.out_channels * (module.in_channels // module.groups) * kh * kw, out
    if isinstance(module, HetConv2d):
        out = _out_hw(module, hw)
        per_group = module.in_channels // module.p
        kh, kw = module.kernel_size
        return out[0] * out[1] * module.out_channels * (per_group * kh * kw + module.in_channels - per_group), out
    if isinstance(module, SeedHetConv2d):
        macs_g, out = conv_macs(module.gwc, hw)
        macs_p, _ = conv_macs(module.pwc, hw)
        return macs_g + macs_p, out
    total, size = 0, hw
    for child in module.children():
        if isinstance(child, (nn.Conv2d, HetConv2d, SeedHetConv2d)):
            macs, size = conv_macs(child, size)
            total += macs
    return total, size


def _short(module: nn.Module) -> str:
    text = repr(module).replace("\n", " ")
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:117] + "..."


def _describe_new(module: nn.Module) -> str:
    extra = ""
    if isinstance(module, HetConv2d):
        extra = f"p={module.p}" + (f", layout={module.layout}" if module.layout != "blocked" else "")
    elif isinstance(module, GWPWConv2d):
        extra = f"groups={module.groups}"
    elif isinstance(module, BSConvS2d):
        extra = f"mid={module.mid_channels}"
    if getattr(module, "with_bn", False):
        extra += (", " if extra else "") + "with_bn"
    return f"{type(module).__name__}({extra})" if extra else type(module).__name__


# --------------------------------------------------------------------------- weight transfer
def _factor(matrix: torch.Tensor, rank: int, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors L (..., a, r) @ R (..., r, b) of ``matrix``
    (Eckart-Young, by SVD). Where the matrix has lower rank than ``rank``, R is
    completed with orthonormal rows and L gets zero columns, so no unit is dead."""
    a, b = matrix.shape[-2:]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=True)
    k = min(a, b, rank)
    left = matrix.new_zeros(*matrix.shape[:-2], a, rank)
    right = matrix.new_zeros(*matrix.shape[:-2], rank, b)
    scale_left = s[..., :k].sqrt() if balanced else s[..., :k]
    scale_right = s[..., :k].sqrt() if balanced else torch.ones_like(s[..., :k])
    left[..., :, :k] = u[..., :, :k] * scale_left[..., None, :]
    right[..., :k, :] = vh[..., :k, :] * scale_right[..., :, None]
    extra = min(rank, b) - k
    if extra > 0:
        right[..., k : k + extra, :] = vh[..., k : k + extra, :]
    return left, right


def _relative_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    norm = target.norm().item()
    return (approx - target).norm().item() / norm if norm > 0 else 0.0


@torch.no_grad()
def _transfer(old: nn.Conv2d, new: nn.Module) -> float:
    """Initialise ``new`` from the dense conv ``old``; return the relative
    Frobenius error of the new layer's effective dense weight (BN as identity)."""
    weight = old.weight.detach().to(torch.float64)
    n, m, kh, kw = weight.shape
    taps = kh * kw

    def put(parameter: torch.Tensor, value: torch.Tensor) -> None:
        parameter.copy_(value.reshape(parameter.shape).to(parameter.dtype))

    def put_bias(conv: nn.Conv2d, value: torch.Tensor | None) -> None:
        if conv.bias is not None:
            conv.bias.copy_(value.to(conv.bias.dtype) if value is not None else torch.zeros_like(conv.bias))

    bias = None if old.bias is None else old.bias.detach()
    if isinstance(new, HetConv2d):
        kxk, pointwise = extract_hetconv_weights(weight, new.p, new.layout, check_structure=False)
        put(new.weight, kxk)
        put(new.pointwise_weight, pointwise)
        if new.bias is not None:
            new.bias.copy_(bias.to(new.bias.dtype))
        return _relative_error(new.dense_weight().to(torch.float64), weight)
    if isinstance(new, (DSConv2d, GWPWConv2d)):
        spatial = new.dw if isinstance(new, DSConv2d) else new.gw
        groups = spatial.groups
        per_group_in = m // groups
        rank = spatial.out_channels // groups  # outputs of one group of the KxK conv
        # W[:, group g] (N, Mg*taps) ~ pw[:, outputs of g] (N, rank) @ kxk[outputs of g] (rank, Mg*taps)
        blocks = weight.reshape(n, groups, per_group_in * taps).permute(1, 0, 2)
        left, right = _factor(blocks, rank)
        put(spatial.weight, right.reshape(groups * rank, per_group_in, kh, kw))
        put(new.pw.weight, left.permute(1, 0, 2).reshape(n, groups * rank))
        put_bias(spatial, None)
        put_bias(new.pw, bias)
        approx = (left @ right).permute(1, 0, 2).reshape(n, m, kh, kw)
        return _relative_error(approx, weight)
    if isinstance(new, (BSConvU2d, BSConvS2d)):
        # W[n] (M, taps) ~ scaling[n] (M, 1) @ blueprint[n] (1, taps)
        left, right = _factor(weight.reshape(n, m, taps), 1)
        put(new.dw.weight, right.reshape(n, 1, kh, kw))
        scaling = left[:, :, 0]  # (N, M)
        approx_scaling = scaling
        if isinstance(new, BSConvU2d):
            put(new.pw.weight, scaling)
        else:
            # scaling (N, M) ~ pw2 (N, M') @ pw1 (M', M), pw1 with orthonormal rows
            pw2, pw1 = _factor(scaling, new.mid_channels, balanced=False)
            put(new.pw1.weight, pw1)
            put(new.pw2.weight, pw2)
            approx_scaling = pw2 @ pw1
        put_bias(new.dw, bias)
        approx = approx_scaling[:, :, None] * right.reshape(n, 1, taps)
        return _relative_error(approx.reshape(n, m, kh, kw), weight)
    raise TypeError(f"no weight transfer for {type(new).__name__}")


# ------------------------------------------------------------------------------ convert
def _as_patterns(value, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        patterns = tuple(value)
        if all(isinstance(p, str) for p in patterns):
            return patterns
    raise TypeError(f"{name} must be a pattern string or a list of them, got {value!r}")


def _largest_divisor(limit: int, *values: int) -> int:
    common = math.gcd(*values)
    return max(d for d in range(1, min(limit, common) + 1) if common % d == 0)


def _named_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every nn.Conv2d (subclasses too) outside leanconv layers, first name only."""
    found, seen = [], set()

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Conv2d):
                if id(child) not in seen:
                    seen.add(id(child))
                    found.append((full, child))
            elif not isinstance(child, LEANCONV_LAYERS):
                walk(child, full + ".")

    if isinstance(model, nn.Conv2d):
        return [("", model)]
    walk(model, "")
    return found


def _shape_pass(model: nn.Module, input_size: Sequence[int]) -> tuple[dict[int, list], list[int]]:
    """Run one zero image through ``model`` (eval mode, no grad, flags restored)
    and record, for every nn.Conv2d, the spatial size of each call's input, and
    the execution order of the convolutions."""
    size = tuple(int(v) for v in input_size)
    if len(size) == 3:
        size = (1, *size)
    if len(size) != 4:
        raise ValueError(f"input_size must be (C, H, W) or (B, C, H, W), got {tuple(input_size)!r}")
    reference = next(iter(model.parameters()), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    calls: dict[int, list] = {}
    order: list[int] = []
    handles = []

    def hook(module, args):
        key = id(module)
        if key not in calls:
            calls[key] = []
            order.append(key)
        calls[key].append(tuple(args[0].shape[-2:]))

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_pre_hook(hook))
    flags = {id(m): m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(size, **factory))
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"the shape pass with input_size={tuple(input_size)} failed: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        for m in model.modules():
            m.training = flags[id(m)]
    return calls, order


def _model_macs(model: nn.Module, input_size) -> int | None:
    """Whole-model MACs from leanconv.accounting, when that module is present."""
    try:
        from . import accounting  # noqa: PLC0415 - optional sibling module
    except ImportError:
        return None
    count = getattr(accounting, "count", None)
    if count is None:
        return None
    try:
        result = count(model, tuple(input_size), convention="exact")
    except Exception:  # noqa: BLE001 - the report still works without it
        return None
    for attribute in ("macs", "total_macs"):
        value = getattr(result, attribute, None)
        if isinstance(value, int):
            return value
    if isinstance(result, dict):
        for key in ("macs", "total_macs"):
            if isinstance(result.get(key), int):
                return result[key]
    return None


def convert(
    model: nn.Module,
    kind: str,
    *,
    inplace: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_stem: bool = True,
    transfer_weights: bool = False,
    p_policy: str = "skip",
    convert_subclasses: bool = False,
    input_size: Sequence[int] | None = None,
    return_report: bool = False,
    verbose: bool = False,
    **layer_options: Any,
):
    """Replace the eligible convolutions of ``model`` by ``kind``.

    Args:
        model: any nn.Module (an nn.Conv2d itself is converted and returned).
        kind: ``"hetconv"``, ``"dsc"``, ``"bsconv_u"``, ``"bsconv_s"``,
            ``"gwpw"`` or ``"standard"`` (replaces nothing; a baseline report).
        inplace: modify ``model`` itself instead of a deep copy.
        include, exclude: fnmatch patterns (or lists) on qualified module names
            such as ``"features.3"`` or ``"layer*.conv2"``; with ``include`` only
            matching convolutions are candidates; ``exclude`` wins.
        skip_stem: leave the stem alone: the first convolution of the network,
            the one on the image channels. With ``input_size`` it is found by
            execution order (the first convolution run whose in_channels equal
            the input's channels); without, it is the first nn.Conv2d in module
            registration order (``named_modules()``).
        transfer_weights: initialise the new layers from the old weights
            instead of fresh initialisation. HetConv keeps each filter's KxK
            kernels on its own channels and only the centre taps elsewhere; DSC,
            GWC+PWC, BSConv-U and BSConv-S use the best low-rank factorisation
            of the dense weight (SVD, Eckart-Young: per input channel for DSC,
            per group for GWC+PWC, per filter for BSConv-U's blueprint, and a
            rank-M' factor of the scaling matrix for BSConv-S, whose pw1 rows
            come out orthonormal). Internal BN layers start as identity. This is
            an *initialisation*, not an equivalence: the converted model computes
            a different function (the report gives each layer's relative weight
            error) and needs fine-tuning.
        p_policy: for HetConv's ``p`` and GWC+PWC's ``groups`` that do not divide
            a layer's channels: ``"skip"`` (leave it, with a reason) or
            ``"largest"`` (use the largest divisor <= p; a layer whose only
            divisor is 1 is skipped). If p divides no candidate at all, a
            ValueError says so.
        convert_subclasses: also replace subclasses of nn.Conv2d (their own
            ``forward`` is lost; the report says so).
        input_size: (C, H, W) or (B, C, H, W): run one zero image through the
            model (eval, no grad) to get each layer's MACs and the stem by
            execution order.
        return_report: return ``(model, report)`` instead of the model.
        verbose: print the report.
        **layer_options: options of ``kind`` as for :func:`leanconv.make_conv`:
            ``p``, ``layout``, ``backend`` (hetconv); ``with_bn``, ``bn_kwargs``;
            ``p``, ``min_mid_channels`` (bsconv_s); ``groups``/``g`` (gwpw);
            ``depth_multiplier`` (dsc). An option of another kind is an error.

    Shared modules (one instance under two names) are replaced once and stay
    shared. Returns the converted model (or ``(model, report)``).

    Example::

        model = leanconv.models.create("vgg16_cifar")
        het, report = leanconv.convert(model, "hetconv", p=4, input_size=(3, 32, 32), return_report=True)
        print(report)
    """
    if kind not in CONV_KINDS:
        raise ValueError(f"conv kind must be one of {CONV_KINDS}, got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() needs an nn.Module, got {type(model).__name__}")
    if p_policy not in P_POLICIES:
        raise ValueError(f"p_policy must be one of {P_POLICIES}, got {p_policy!r}")
    check_kind_options(kind, layer_options)
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude")
    if transfer_weights and kind == "standard":
        raise ValueError("transfer_weights does not apply to kind 'standard' (nothing is replaced)")

    params_before = _count_params(model)
    target = model if inplace else copy.deepcopy(model)
    report_options = dict(layer_options)
    for name, value, default in (
        ("include", include, None), ("exclude", exclude, None), ("skip_stem", skip_stem, True),
        ("transfer_weights", transfer_weights, False), ("p_policy", p_policy, "skip"),
        ("convert_subclasses", convert_subclasses, False),
    ):
        if value != default:
            report_options[name] = value
    report = ConversionReport(kind=kind, options=report_options, params_before=params_before)

    calls: dict[int, list] = {}
    order: list[int] = []
    if input_size is not None:
        report.input_size = tuple(int(v) for v in input_size)
        calls, order = _shape_pass(target, input_size)
        report.model_macs_before = _model_macs(target, input_size)

    convs = _named_convs(target)
    stem_id = None
    if skip_stem and convs:
        if order:
            channels = report.input_size[-3]
            by_id = {id(c): c for _, c in convs}
            candidates = [key for key in order if key in by_id]
            matching = [key for key in candidates if by_id[key].in_channels == channels]
            stem_id = (matching or candidates or [id(convs[0][1])])[0]
        else:
            stem_id = id(convs[0][1])

    replacement: dict[int, nn.Module] = {}
    records: dict[int, ReplacedLayer] = {}
    divisor_failures = 0
    candidates = 0

    def option_for(conv: nn.Conv2d) -> tuple[dict | None, str, str]:
        """(options for make_conv or None, reason when None, note)."""
        nonlocal divisor_failures
        options = dict(layer_options)
        if kind == "hetconv" or kind == "gwpw":
            key = "p" if kind == "hetconv" else ("groups" if "groups" in options else "g")
            wanted = options[key]
            channels = (conv.in_channels, conv.out_channels) if kind == "hetconv" else (conv.in_channels,)
            if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 1:
                if any(c % wanted for c in channels):
                    what = " and ".join(f"{label}={c}" for label, c in zip(("in_channels", "out_channels"), channels))
                    if p_policy == "largest":
                        divisor = _largest_divisor(wanted, *channels)
                        if divisor == 1:
                            divisor_failures += 1
                            return None, f"{key}={wanted}: no divisor > 1 of {what} (p_policy='largest')", ""
                        options[key] = divisor
                        return options, "", f"{key}={divisor}: largest divisor <= {wanted} of {what}"
                    divisor_failures += 1
                    return None, f"{key}={wanted} does not divide {what} (p_policy='skip')", ""
        return options, "", ""

    def decide(name: str, conv: nn.Conv2d) -> tuple[nn.Module | None, str, str]:
        nonlocal candidates
        if type(conv) is not nn.Conv2d and not convert_subclasses:
            return None, f"a subclass of nn.Conv2d ({type(conv).__name__}); convert_subclasses=True replaces it", ""
        if conv.groups != 1:
            return None, f"grouped (groups={conv.groups})", ""
        kh, kw = conv.kernel_size
        if kh == 1 and kw == 1:
            return None, "1x1 kernel (pointwise: nothing to separate)", ""
        if kh % 2 == 0 or kw % 2 == 0 or kh == 1 or kw == 1:
            return None, f"kernel {kh}x{kw}: needs an odd size > 1 in both dimensions", ""
        if id(conv) == stem_id:
            return None, "stem (first convolution, on the image channels); skip_stem=False converts it", ""
        if include_patterns and not any(fnmatch.fnmatchcase(name, p) for p in include_patterns):
            return None, f"not matched by include={list(include_patterns)}", ""
        matched = [p for p in exclude_patterns if fnmatch.fnmatchcase(name, p)]
        if matched:
            return None, f"matched by exclude pattern {matched[0]!r}", ""
        if kind == "standard":
            return None, "kind 'standard': already a standard convolution", ""
        candidates += 1
        options, reason, note = option_for(conv)
        if options is None:
            return None, reason, ""
        if type(conv) is not nn.Conv2d:
            note = (note + "; " if note else "") + f"was {type(conv).__name__}: its own forward is not kept"
        new = make_conv(
            kind, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype, **options,
        )
        return new.train(conv.training), "", note

    def handle(name: str, conv: nn.Conv2d) -> nn.Module:
        key = id(conv)
        if key in replacement:
            if key in records:
                records[key].aliases += (name,)
            return replacement[key]
        new, reason, note = decide(name, conv)
        if new is None:
            replacement[key] = conv
            report.skipped.append(SkippedLayer(name or "(model)", _short(conv), reason))
            return conv
        error = _transfer(conv, new) if transfer_weights else None
        macs_before = macs_after = None
        if key in calls:
            macs_before = sum(conv_macs(conv, hw)[0] for hw in calls[key])
            macs_after = sum(conv_macs(new, hw)[0] for hw in calls[key])
        record = ReplacedLayer(
            name or "(model)", _short(conv), _describe_new(new), _count_params(conv), _count_params(new),
            macs_before, macs_after, note=note, transfer_error=error,
        )
        replacement[key] = new
        records[key] = record
        report.replaced.append(record)
        return new

    visited: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, nn.Conv2d):
                new = handle(full, child)
                if new is not child:
                    setattr(module, name, new)
            elif not isinstance(child, LEANCONV_LAYERS):
                walk(child, full + ".")

    if isinstance(target, nn.Conv2d):
        stem_id = None  # a lone convolution is not a network's stem
        target = handle("", target)
    else:
        walk(target, "")

    if kind in ("hetconv", "gwpw") and candidates and divisor_failures == candidates:
        key = "p" if kind == "hetconv" else "groups"
        value = layer_options.get("p") if kind == "hetconv" else layer_options.get("groups", layer_options.get("g"))
        raise ValueError(
            f"{key}={value} divides the channels of none of the {candidates} eligible convolution(s); "
            + "; ".join(f"{s.name}: {s.reason}" for s in report.skipped if s.reason.startswith(f"{key}="))[:600]
        )

    report.params_after = _count_params(target)
    if input_size is not None and report.model_macs_before is not None:
        report.model_macs_after = _model_macs(target, input_size)
    if verbose:
        print(report)
    return (target, report) if return_report else target


# --------------------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "leanconv.convert/1"


def save_converted(path, model: nn.Module, source: dict, kind: str, options: dict, report: ConversionReport | None = None) -> None:
    """Save a converted model atomically (temporary file + rename): its
    state_dict and what :func:`load_converted` needs to rebuild it.

    ``source`` is ``{"zoo": name, "create_kwargs": {...}}`` or
    ``{"callable": "module:function"}``; ``options`` are :func:`convert`'s
    (include ``input_size`` when the conversion used one: the stem is then
    found by execution order, and the rebuild must find the same one)."""
    import os
    import tempfile

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "source": source,
        "kind": kind,
        "options": options,
        "state_dict": model.state_dict(),
        "report": None if report is None else report.to_dict(),
    }
    from . import __version__

    payload["leanconv_version"] = __version__
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def build_source(source: dict) -> nn.Module:
    """The unconverted model a checkpoint's ``source`` describes."""
    if "zoo" in source:
        from . import models

        return models.create(source["zoo"], **source.get("create_kwargs", {}))
    if "callable" in source:
        return load_callable(source["callable"])()
    raise ValueError(f"checkpoint source must name a zoo model or a module:function, got {source!r}")


def load_callable(spec: str):
    """``"package.module:function"`` -> the function. The module is looked up
    on ``sys.path`` and in the current directory (as ``python -m`` would)."""
    import importlib
    import os
    import sys

    if ":" not in spec:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {error}") from error
    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        function = getattr(function, part)
    if not callable(function):
        raise ValueError(f"{spec!r} is not callable")
    return function


def load_converted(path, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by ``leanconv convert --out`` / :func:`save_converted`.

    Example::

        from leanconv.convert import load_converted
        model = load_converted("vgg16_hetconv_p4.pt")
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a leanconv convert checkpoint (format {CHECKPOINT_FORMAT!r})")
    model = build_source(payload["source"])
    options = dict(payload["options"])
    options.pop("transfer_weights", None)
    options.pop("verbose", None)
    options.pop("return_report", None)
    if options.get("input_size") is not None:
        options["input_size"] = tuple(options["input_size"])
    converted = convert(model, payload["kind"], inplace=True, **options)
    converted.load_state_dict(payload["state_dict"])
    return converted
