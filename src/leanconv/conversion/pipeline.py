"""``convert(model, kind)``: swap a network's dense convolutions for HetConv,
DSC, BSConv-U/S or GWC+PWC, as a sequence of named steps.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.
BSConv: Haase & Amthor, CVPR 2020, https://arxiv.org/abs/2003.13549.

1. :func:`trace_calls` (with ``input_size``): one zero image through the
   model records each convolution's input sizes and the execution order.
2. :func:`find_candidates`: every ``nn.Conv2d`` outside leanconv's own
   layers, once per instance, with every place it is attached (shared
   convolutions stay shared).
3. :func:`find_stem`: the first convolution on the image channels.
4. :func:`decide`: replace or leave alone, with the reason. Eligible means an
   ``nn.Conv2d`` of exact type with no hooks (subclasses, parametrized weights
   and hooked convolutions compute something else; ``convert_subclasses=True``
   replaces them, saying so), ``groups == 1``, an odd kernel larger than 1 in
   both dimensions, not the stem (``skip_stem``), matched by ``include`` and
   not by ``exclude``, channels that HetConv's P / GWPW's groups divide
   (``p_policy``).
5. :func:`build`: the new layer from the old one's hyper-parameters, device,
   dtype and train/eval flag (:func:`leanconv.layers.make_conv`).
6. :func:`compare_cost`: the new layer must have fewer MACs per output pixel
   and fewer parameters than the old one, or it is left alone with both
   figures in the reason (``allow_costlier=True`` replaces it anyway).
7. :func:`leanconv.conversion.transfer.transfer_weights` (``transfer_weights``).
8. :func:`place` and the :class:`ConversionReport`.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..accounting import count, count_parameters, example_input, layer_macs, macs_per_output_pixel
from ..conv_spec import resolve_conv
from ..layers import LeanConvLayer, make_conv
from ..layers.conv_spec import kind_divisor
from .calibrate import CalibrationSettings, calibrate
from .report import ConversionReport, ReplacedLayer, SkippedLayer
from .transfer import transfer_weights as transfer

__all__ = [
    "Candidate", "ConversionPlan", "Decision", "P_POLICIES", "build", "compare_cost", "convert", "decide",
    "find_candidates", "find_stem", "place", "trace_calls",
]

P_POLICIES = ("skip", "largest")


# ------------------------------------------------------------------ the request
@dataclass(frozen=True)
class ConversionPlan:
    """What :func:`convert` was asked to do, validated."""

    kind: str
    layer_options: dict
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_stem: bool = True
    p_policy: str = "skip"
    convert_subclasses: bool = False
    allow_costlier: bool = False
    transfer_weights: bool = False

    @classmethod
    def from_arguments(cls, kind: str, layer_options: dict, *, include=None, exclude=None, **switches) -> ConversionPlan:
        kind, options = resolve_conv(kind, layer_options)
        if switches.get("p_policy", "skip") not in P_POLICIES:
            raise ValueError(f"p_policy must be one of {P_POLICIES}, got {switches['p_policy']!r}")
        if switches.get("transfer_weights") and kind == "standard":
            raise ValueError("transfer_weights does not apply to kind 'standard' (nothing is replaced)")
        return cls(kind, options, _as_patterns(include, "include"), _as_patterns(exclude, "exclude"), **switches)

    @property
    def divisor_option(self) -> str | None:
        """The option that must divide a layer's channels (the kind's ``kind_divisor``: HetConv's p,
        GWPW's groups), or None."""
        return None if self.kind == "standard" else kind_divisor(self.kind, self.layer_options)[0]

    def report_options(self) -> dict:
        """The layer options and every switch that differs from its default."""
        options = dict(self.layer_options)
        for name in ("include", "exclude"):
            if getattr(self, name):
                options[name] = list(getattr(self, name))
        defaults = ConversionPlan(self.kind, {})
        for name in ("skip_stem", "p_policy", "convert_subclasses", "allow_costlier", "transfer_weights"):
            if getattr(self, name) != getattr(defaults, name):
                options[name] = getattr(self, name)
        return options


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


# ------------------------------------------------------------- steps 1 to 3
@dataclass
class Candidate:
    """One convolution instance: its first qualified name, every (parent,
    attribute) it hangs from, and the input size of each call in the shape pass."""

    name: str
    conv: nn.Conv2d
    places: list[tuple[nn.Module, str]] = field(default_factory=list)
    aliases: tuple[str, ...] = ()
    input_sizes: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class CallTrace:
    """Input spatial size of every call of every convolution, and the order they first ran."""

    input_size: tuple[int, ...]
    sizes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)


def trace_calls(model: nn.Module, input_size: Sequence[int]) -> CallTrace:
    """Run one zero image through ``model`` (eval mode, no grad, train flags
    restored) and record each nn.Conv2d's calls."""
    zeros = example_input(model, tuple(input_size))
    trace = CallTrace(tuple(int(v) for v in input_size))

    def record(module, args):
        if id(module) not in trace.sizes:
            trace.sizes[id(module)] = []
            trace.order.append(id(module))
        trace.sizes[id(module)].append(tuple(args[0].shape[-2:]))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(zeros)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"the shape pass with input_size={tuple(input_size)} failed: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
    return trace


def find_candidates(model: nn.Module, trace: CallTrace | None = None) -> list[Candidate]:
    """Every nn.Conv2d (subclasses too) outside leanconv layers, in
    registration order, one Candidate per instance."""
    found: dict[int, Candidate] = {}
    visited: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Conv2d):
                if id(child) in found:
                    candidate = found[id(child)]
                    candidate.aliases += (full,)
                else:
                    candidate = found[id(child)] = Candidate(full, child)
                candidate.places.append((module, name))
            elif not isinstance(child, LeanConvLayer):
                walk(child, full + ".")

    if isinstance(model, nn.Conv2d):
        found[id(model)] = Candidate("(model)", model)
    else:
        walk(model, "")
    for candidate in found.values():
        candidate.input_sizes = list(trace.sizes.get(id(candidate.conv), [])) if trace else []
    return list(found.values())


def find_stem(candidates: list[Candidate], trace: CallTrace | None) -> Candidate | None:
    """The network's first convolution: with a shape pass, the first to run
    on the image channels (else the first to run); without, the first in
    registration order. A lone convolution is not a stem."""
    if not candidates or candidates[0].name == "(model)":
        return None
    if trace is None or not trace.order:
        return candidates[0]
    by_id = {id(c.conv): c for c in candidates}
    ran = [by_id[key] for key in trace.order if key in by_id]
    on_image = [c for c in ran if c.conv.in_channels == trace.input_size[-3]]
    return (on_image or ran or candidates)[0]


# --------------------------------------------------------------- step 4: decide
@dataclass
class Decision:
    """``options`` for make_conv when the layer is replaced, else the ``reason``
    it is left alone; ``note`` says what the report should add."""

    options: dict | None
    reason: str = ""
    note: str = ""
    divisor_failed: bool = False

    @property
    def replace(self) -> bool:
        return self.options is not None


def _why_not_plain(conv: nn.Conv2d) -> str:
    """Why this conv computes more than nn.Conv2d's forward on its weight ("" if it does not)."""
    if parametrize.is_parametrized(conv):
        names = ", ".join(conv.parametrizations.keys())
        return f"parametrized ({names}: torch.nn.utils.parametrize)"
    if type(conv) is not nn.Conv2d:
        return f"a subclass of nn.Conv2d ({type(conv).__name__}) with its own behaviour"
    if conv._forward_pre_hooks or conv._forward_hooks:
        return "has forward hooks (e.g. torch.nn.utils.weight_norm)"
    return ""


def _largest_divisor(limit: int, *values: int) -> int:
    common = math.gcd(*values)
    return max(d for d in range(1, min(limit, common) + 1) if common % d == 0)


def _divisor_options(conv: nn.Conv2d, plan: ConversionPlan) -> Decision:
    options = dict(plan.layer_options)
    key = plan.divisor_option
    if key is None:
        return Decision(options)
    wanted = options[key]
    channels = tuple(getattr(conv, name) for name in kind_divisor(plan.kind, options)[1])
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1 or not any(c % wanted for c in channels):
        return Decision(options)  # make_conv names a bad value
    what = " and ".join(f"{label}={c}" for label, c in zip(("in_channels", "out_channels"), channels))
    if plan.p_policy == "skip":
        return Decision(None, f"{key}={wanted} does not divide {what} (p_policy='skip')", divisor_failed=True)
    divisor = _largest_divisor(wanted, *channels)
    if divisor == 1:
        return Decision(None, f"{key}={wanted}: no divisor > 1 of {what} (p_policy='largest')", divisor_failed=True)
    return Decision({**options, key: divisor}, note=f"{key}={divisor}: largest divisor <= {wanted} of {what}")


def decide(candidate: Candidate, plan: ConversionPlan, stem: Candidate | None = None) -> Decision:
    """Replace ``candidate`` (with which make_conv options) or not, and why."""
    conv, name = candidate.conv, candidate.name
    unusual = _why_not_plain(conv)
    if unusual and not plan.convert_subclasses:
        return Decision(None, f"{unusual}; convert_subclasses=True replaces it, dropping that behaviour")
    if conv.groups != 1:
        return Decision(None, f"grouped (groups={conv.groups})")
    kh, kw = conv.kernel_size
    if kh == 1 and kw == 1:
        return Decision(None, "1x1 kernel (pointwise: nothing to separate)")
    if kh % 2 == 0 or kw % 2 == 0 or kh == 1 or kw == 1:
        return Decision(None, f"kernel {kh}x{kw}: needs an odd size > 1 in both dimensions")
    if candidate is stem:
        return Decision(None, "stem (first convolution, on the image channels); skip_stem=False converts it")
    if plan.include and not any(fnmatch.fnmatchcase(name, p) for p in plan.include):
        return Decision(None, f"not matched by include={list(plan.include)}")
    matched = [p for p in plan.exclude if fnmatch.fnmatchcase(name, p)]
    if matched:
        return Decision(None, f"matched by exclude pattern {matched[0]!r}")
    if plan.kind == "standard":
        return Decision(None, "kind 'standard': already a standard convolution")
    decision = _divisor_options(conv, plan)
    if decision.replace and unusual:
        decision.note = "; ".join(filter(None, (decision.note, f"was {unusual}: that is not kept")))
    return decision


# ------------------------------------------------------- steps 5 to 8: build, cost, place
def build(conv: nn.Conv2d, kind: str, options: dict) -> nn.Module:
    """A ``kind`` layer with ``conv``'s hyper-parameters, device, dtype and train flag."""
    new = make_conv(
        kind, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype, **options,
    )
    return new.train(conv.training)


@dataclass
class CostComparison:
    """Parameters and MACs of the old and the new layer. ``macs_*`` sum the
    shape pass's calls (None without one); the verdict compares MACs per
    output pixel, which needs no input size."""

    params_before: int
    params_after: int
    per_pixel_before: Fraction
    per_pixel_after: Fraction
    macs_before: int | None = None
    macs_after: int | None = None

    @property
    def cheaper(self) -> bool:
        return self.per_pixel_after < self.per_pixel_before and self.params_after < self.params_before

    def why_not_cheaper(self) -> str:
        return (f"not cheaper: {_number(self.per_pixel_after)} MACs per output pixel (was "
                f"{_number(self.per_pixel_before)}), {self.params_after:,} parameters (was {self.params_before:,}); "
                f"allow_costlier=True replaces it anyway")


def _number(value: Fraction) -> str:
    return f"{int(value):,}" if value.denominator == 1 else f"{float(value):,.1f}"


def compare_cost(candidate: Candidate, new: nn.Module) -> CostComparison:
    """The old and new layer's parameters and MACs (see :class:`CostComparison`)."""
    old = candidate.conv
    comparison = CostComparison(count_parameters(old), count_parameters(new), macs_per_output_pixel(old),
                                macs_per_output_pixel(new))
    if candidate.input_sizes:
        comparison.macs_before = sum(layer_macs(old, hw)[0] for hw in candidate.input_sizes)
        comparison.macs_after = sum(layer_macs(new, hw)[0] for hw in candidate.input_sizes)
    return comparison


def place(candidate: Candidate, new: nn.Module) -> None:
    """Attach ``new`` wherever the candidate's conv hangs."""
    for parent, attribute in candidate.places:
        setattr(parent, attribute, new)


def _short(module: nn.Module) -> str:
    text = " ".join(repr(module).split())
    return text if len(text) <= 120 else text[:117] + "..."


def _describe_new(module: nn.Module) -> str:
    options = module.summary_options() if isinstance(module, LeanConvLayer) else []
    return f"{type(module).__name__}({', '.join(options)})" if options else type(module).__name__


def _check_divisor_helped(plan: ConversionPlan, decisions: list[tuple[Candidate, Decision]]) -> None:
    """A p (or groups) that divides no eligible layer is an error, not an empty report."""
    reached = [(c, d) for c, d in decisions if d.replace or d.divisor_failed]
    if plan.divisor_option and reached and all(d.divisor_failed for _, d in reached):
        key = plan.divisor_option
        details = "; ".join(f"{c.name}: {d.reason}" for c, d in reached)[:600]
        raise ValueError(f"{key}={plan.layer_options[key]} divides the channels of none of the {len(reached)} "
                         f"eligible convolution(s); {details}")


# ------------------------------------------------------------------------ convert
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
    allow_costlier: bool = False,
    input_size: Sequence[int] | None = None,
    calibration=None,
    calibration_settings: CalibrationSettings | dict | None = None,
    return_report: bool = False,
    verbose: bool = False,
    **layer_options: Any,
):
    """Replace the eligible convolutions of ``model`` by ``kind``.

    Args:
        model: any nn.Module (an nn.Conv2d itself is converted and returned).
        kind: a kind (``"hetconv"``, ``"dsc"``, ``"bsconv_u"``, ``"bsconv_s"``,
            ``"gwpw"``, or ``"standard"``: replaces nothing, a baseline report)
            or a spec with its options, ``"hetconv:p=4,layout=shifted"``.
        inplace: modify ``model`` itself instead of a deep copy.
        include, exclude: fnmatch patterns (or lists) on qualified module names
            such as ``"features.3"`` or ``"layer*.conv2"``; with ``include`` only
            matching convolutions are candidates; ``exclude`` wins.
        skip_stem: leave the stem alone: the first convolution of the network,
            the one on the image channels. With ``input_size`` it is found by
            execution order; without, it is the first nn.Conv2d in module
            registration order.
        transfer_weights: initialise the new layers from the old weights (see
            :mod:`leanconv.conversion.transfer`): HetConv keeps each filter's KxK
            kernels on its own channels and the centre taps elsewhere (exact
            for p=1); the separable kinds get the best low-rank factorisation
            of the dense weight. An *initialisation*, not an equivalence: the
            report gives each layer's relative weight error.
        p_policy: for HetConv's ``p`` and GWPW's groups that do not divide a
            layer's channels: ``"skip"`` (leave it, with a reason) or
            ``"largest"`` (the largest divisor <= p; a layer whose only divisor
            is 1 is skipped). If p divides no eligible layer, a ValueError.
        convert_subclasses: also replace nn.Conv2d subclasses, parametrized
            convolutions and convolutions with forward hooks (weight norm);
            their extra behaviour is lost (the report says so; with
            ``transfer_weights`` the current effective weight is transferred).
        allow_costlier: replace a layer even when the replacement does not
            have fewer MACs per output pixel and fewer parameters (by default
            such a layer is left alone with both figures in the reason).
        input_size: (C, H, W) or (B, C, H, W): one zero image through the
            model gives each layer's MACs, the model's totals (the figures of
            :func:`leanconv.count` and ``leanconv profile``) and the stem by
            execution order. With ``calibration`` it defaults to the images' size.
        calibration: images (a (B, C, H, W) tensor, or an iterable of such
            batches or of (images, labels) pairs) for data-aware conversion,
            with ``transfer_weights=True``: after the transfer, every replaced
            layer is fitted in execution order to reproduce the original
            layer's output given the input it receives in the converted
            network; BatchNorm statistics after a replaced layer are
            re-estimated where that lowers the error
            (:mod:`leanconv.conversion.calibrate`). The report gives each layer's
            relative output error before and after the fit. The images should
            be preprocessed as in training (the model's own input).
        calibration_settings: a :class:`~leanconv.conversion.calibrate.CalibrationSettings`
            or a dict of its fields (pixels_per_image, ridge, als_iterations,
            max_features, batch_size, seed).
        return_report: return ``(model, report)`` instead of the model.
        verbose: print the report.
        **layer_options: options of ``kind`` as for :func:`leanconv.make_conv`
            (``p``, ``layout``, ``backend``; ``with_bn``, ``bn_kwargs``;
            ``min_mid_channels``; ``groups``/``g``; ``depth_multiplier``). An
            option of another kind, or one that contradicts the spec, is an error.

    Shared modules (one instance under two names) are replaced once and stay
    shared. Returns the converted model (or ``(model, report)``).

    Example::

        model = leanconv.models.create("vgg16_cifar")
        het, report = leanconv.convert(model, "hetconv:p=4", input_size=(3, 32, 32), return_report=True)
        print(report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() needs an nn.Module as model, got {type(model).__name__}")
    plan = ConversionPlan.from_arguments(
        kind, layer_options, include=include, exclude=exclude, skip_stem=skip_stem, p_policy=p_policy,
        convert_subclasses=convert_subclasses, allow_costlier=allow_costlier, transfer_weights=transfer_weights,
    )
    report = ConversionReport(kind=plan.kind, options=plan.report_options(), params_before=count_parameters(model))
    settings = _calibration_settings(calibration, calibration_settings, plan)
    batches = None
    if calibration is not None:
        from .calibrate import as_batches

        batches = as_batches(calibration, settings.batch_size)
        input_size = tuple(batches[0].shape[1:]) if input_size is None else input_size
    teacher = None if calibration is None else (_copy(model) if inplace else model)
    target = model if inplace else _copy(model)
    trace = None
    if input_size is not None:
        trace = trace_calls(target, input_size)
        report.input_size = trace.input_size
        report.model_macs_before = count(target, trace.input_size).macs
    candidates = find_candidates(target, trace)
    stem = find_stem(candidates, trace) if plan.skip_stem else None

    decisions = [(candidate, decide(candidate, plan, stem)) for candidate in candidates]
    _check_divisor_helped(plan, decisions)
    fitted = []
    for candidate, decision in decisions:
        record, new = _replace(candidate, decision, plan)
        if new is None:
            report.skipped.append(record)
        else:
            report.replaced.append(record)
            fitted.append((candidate, new, record))
            target = new if candidate.conv is target else target
    if batches is not None and fitted:
        report.blocks = _calibrate(teacher, target, fitted, trace, batches, settings)

    report.params_after = count_parameters(target)
    if trace is not None:
        report.model_macs_after = count(target, trace.input_size).macs
    if verbose:
        print(report)
    return (target, report) if return_report else target


def _calibration_settings(calibration, settings, plan: ConversionPlan) -> CalibrationSettings:
    if calibration is None:
        if settings is not None:
            raise ValueError("calibration_settings needs calibration images (calibration=...)")
        return CalibrationSettings()
    if not plan.transfer_weights:
        raise ValueError("calibration needs transfer_weights=True: the fit starts from the transferred weights")
    if settings is None:
        return CalibrationSettings()
    if isinstance(settings, CalibrationSettings):
        return settings
    if isinstance(settings, dict):
        known = set(CalibrationSettings.__dataclass_fields__)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"calibration_settings: unknown key(s) {unknown}; known: {sorted(known)}")
        return CalibrationSettings(**settings)
    raise TypeError(f"calibration_settings must be a CalibrationSettings or a dict, got {type(settings).__name__}")


def _calibrate(teacher, student, fitted, trace: CallTrace, batches, settings: CalibrationSettings) -> list:
    """Fit the replaced layers in the order the network runs them and reconstruct their
    blocks (see :mod:`.calibrate`); returns the blocks' reports."""
    order = {key: position for position, key in enumerate(trace.order)}
    fitted = sorted(fitted, key=lambda item: order.get(id(item[0].conv), len(order)))
    layers = []
    for candidate, new, _ in fitted:
        old = teacher if candidate.name == "(model)" else teacher.get_submodule(candidate.name)
        layers.append((old, new, len(candidate.input_sizes)))
    fits, blocks = calibrate(teacher, student, layers, batches, settings)
    for (_, _, record), fit in zip(fitted, fits):
        record.calibration = fit
    return blocks


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 - e.g. legacy torch.nn.utils.weight_norm
        raise ValueError(f"convert(model, inplace=False) works on a copy, but this model cannot be deep-copied "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); pass inplace=True") from error


def _replace(candidate: Candidate, decision: Decision, plan: ConversionPlan):
    """Steps 5 to 8 for one candidate: build, compare cost, transfer, place.
    Returns (SkippedLayer, None) or (ReplacedLayer, the new layer)."""
    conv = candidate.conv
    if not decision.replace:
        return SkippedLayer(candidate.name, _short(conv), decision.reason), None
    new = build(conv, plan.kind, decision.options)
    cost = compare_cost(candidate, new)
    if not cost.cheaper and not plan.allow_costlier:
        return SkippedLayer(candidate.name, _short(conv), cost.why_not_cheaper()), None
    note = decision.note if cost.cheaper else "; ".join(filter(None, (decision.note, "costlier (allow_costlier=True)")))
    error = transfer(conv, new) if plan.transfer_weights else None
    place(candidate, new)
    record = ReplacedLayer(candidate.name, _short(conv), _describe_new(new), cost.params_before, cost.params_after,
                           cost.macs_before, cost.macs_after, aliases=candidate.aliases, note=note,
                           transfer_error=error)
    return record, new
