"""Cost accounting: multiply-accumulates (MACs) and parameters of a model.

``count(model, input_size)`` runs the model once on a zero input of that size
and records, for every convolution and linear layer it calls, the MACs its
definition implies. Units are **MACs**; FLOPs = 2 x MACs.

Conventions
-----------
``exact`` (default)
    MACs as the layer computes them by definition; bias adds, BN,
    activations and pooling are not counted.

    * ``nn.Conv1d/2d/3d`` (any ``groups``): output elements x
      (in_channels / groups) x kernel volume.
    * ``nn.ConvTranspose*``: input elements x (out_channels / groups) x kernel volume.
    * :class:`~leanconv.HetConv2d`: Ho*Wo*N*(M/P*kh*kw + M - M/P) per image,
      whichever backend runs it (the reference backend's dense convolution
      multiplies zeros; those are not HetConv's MACs).
    * ``nn.Linear``: leading elements x in_features x out_features.
    * DSC, BSConv-U/S, GWPW and the approximate form are containers of ``nn.Conv2d``
      and are counted through them.

``paper``
    The HetConv paper's reporting convention (Singh et al., CVPR 2019; see
    ../shared/BACKGROUND.md): every convolution counts its MACs plus one
    bias add per output element (whether or not it has a bias); a HetConv
    layer counts R(P) = 1/P + (1 - 1/P)/(kh*kw) times the MACs plus bias adds
    of the standard convolution it replaces; linear layers in x out. With it
    ``vgg16_cifar`` (standard) has 313.74 M MACs, the paper's figure.

Counts are for the input given: ``input_size=(C, H, W)`` (or a batch of one)
gives per-image figures, ``(B, C, H, W)`` the whole batch. Parameters are the
model's unique parameters (all of them, BN included), whatever the input.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
import torch.nn as nn

from .layers import LeanConvLayer
from .layers.protocol import conv_macs_per_output, hetconv_mac_ratio, hetconv_macs_per_output, mac_stages
from .ops.conv_geometry import conv_output_size, normalize_padding

__all__ = [
    "CONVENTIONS", "CostReport", "LayerCost", "conv_macs_per_output", "count", "count_parameters", "example_input",
    "format_macs",
    "hetconv_mac_ratio", "hetconv_macs_per_output", "layer_macs", "macs_per_output_pixel",
]

CONVENTIONS = ("exact", "paper")


def format_macs(macs: float) -> str:
    """``313740288`` -> ``"313.74 M"`` (MACs; FLOPs are twice that)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(macs) >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs:.0f}"


@dataclass
class LayerCost:
    """One call of one counted layer."""

    name: str
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    macs: int
    detail: str = ""

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass
class CostReport:
    """The result of :func:`count`: per-layer ``rows`` and totals.

    ``macs`` sums the rows (MACs; ``flops`` = 2 x ``macs``); ``params`` is the
    number of parameters of the whole model (unique tensors, BN and
    everything else included); ``layer_params`` sums the counted layers'.
    """

    convention: str
    input_size: tuple[int, ...]
    rows: list[LayerCost] = field(default_factory=list)
    params: int = 0

    @property
    def macs(self) -> int:
        return sum(row.macs for row in self.rows)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def layer_params(self) -> int:
        return sum(row.params for row in self.rows)

    def to_dict(self) -> dict:
        return {
            "convention": self.convention,
            "unit": "MACs (FLOPs = 2 x MACs)",
            "input_size": list(self.input_size),
            "macs": self.macs,
            "params": self.params,
            "rows": [{**asdict(row), "input_shape": list(row.input_shape), "output_shape": list(row.output_shape)}
                     for row in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, per_layer: bool = True) -> str:
        """A terminal table of the rows (optional) and the totals."""
        lines = []
        if per_layer and self.rows:
            name_width = max(len("layer"), *(len(r.name) for r in self.rows))
            type_width = max(len("type"), *(len(r.type) for r in self.rows))
            header = (f"{'layer':<{name_width}}  {'type':<{type_width}}  {'output':>16}  {'params':>12}  "
                      f"{'MACs':>15}  {'share':>6}  detail")
            lines += [header, "-" * len(header)]
            total = max(self.macs, 1)
            for r in self.rows:
                shape = "x".join(str(v) for v in r.output_shape[1:])
                lines.append(f"{r.name:<{name_width}}  {r.type:<{type_width}}  {shape:>16}  {r.params:>12,}  "
                             f"{r.macs:>15,}  {100 * r.macs / total:>5.1f}%  {r.detail}")
            lines.append("")
        lines.append(f"total: {self.macs:,} MACs ({format_macs(self.macs)}MACs, {format_macs(self.flops)}FLOPs; "
                     f"FLOPs = 2 x MACs), {self.params:,} parameters; convention {self.convention!r}, "
                     f"input {tuple(self.input_size)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------- formulas
# The one home of leanconv's MAC and parameter formulas: counting, model
# conversion, the zoo, benchmarks and scripts all use these.
def count_parameters(module: nn.Module) -> int:
    """Parameters of ``module`` (each shared tensor once)."""
    return sum(t.numel() for t in module.parameters())


def _output_size(conv: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    padding = getattr(conv, "_padding_pair", None) or normalize_padding(conv.padding, kernel, stride, dilation,
                                                                       allow_uneven_same=True)
    if padding is None:  # an uneven 'same' (stride 1): the input's size
        return tuple(hw)
    return tuple(conv_output_size(hw[i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))


def layer_macs(module: nn.Module, input_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """MACs of one call of a convolution layer of any kind (``nn.Conv2d``,
    ``HetConv2d``, DSC, GWPW, BSConv-U/S, the approximate form) on one image of
    spatial size ``input_hw``, and its output size. FLOPs = 2 x MACs; biases
    and BN are not counted.

    Example::

        layer_macs(leanconv.make_conv("dsc", 8, 12, 3, padding=1), (9, 9))   # (9*9*8*(9 + 12), (9, 9))
    """
    total, hw = 0, tuple(input_hw)
    for conv, per_output in mac_stages(module):
        hw = _output_size(conv, hw)
        total += hw[0] * hw[1] * conv.out_channels * per_output
    return total, hw


def macs_per_output_pixel(module: nn.Module) -> Fraction:
    """MACs per pixel of the layer's output on a large image (exact, as a
    fraction): a convolution before a strided one runs on more pixels
    (BSConv's 1x1 at input resolution costs stride_h*stride_w times more).
    What :func:`leanconv.convert` compares to call a replacement cheaper."""
    total, density = Fraction(0), Fraction(1)  # pixels of the current stage per input pixel
    for conv, per_output in mac_stages(module):
        density /= conv.stride[0] * conv.stride[1]
        total += density * conv.out_channels * per_output
    return total / density


def _row(name: str, module: nn.Module, inputs: torch.Tensor, output: torch.Tensor, convention: str) -> LayerCost | None:
    in_shape, out_shape = tuple(inputs.shape), tuple(output.shape)
    if isinstance(module, LeanConvLayer):
        counted = module.count_macs(output, convention)
        if counted is not None:
            macs, detail = counted
            return LayerCost(name, type(module).__name__, in_shape, out_shape, count_parameters(module), macs, detail)
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel_volume = math.prod(module.kernel_size)
        if module.transposed:  # every input element meets out_channels/groups x kernel weights
            macs = inputs.numel() * conv_macs_per_output(module.out_channels, kernel_volume, module.groups)
        else:
            macs = output.numel() * conv_macs_per_output(module.in_channels, kernel_volume, module.groups)
        if convention == "paper" and not module.transposed:
            macs += output.numel()
        detail = f"k={'x'.join(map(str, module.kernel_size))}" + (f", groups={module.groups}" if module.groups > 1 else "")
        return LayerCost(name, type(module).__name__, in_shape, out_shape, count_parameters(module), macs, detail)
    if isinstance(module, nn.Linear):
        macs = output.numel() // module.out_features * module.in_features * module.out_features
        return LayerCost(name, "Linear", in_shape, out_shape, count_parameters(module), macs, "")
    return None


def _counted(module: nn.Module) -> bool:
    """A row of its own: a convolution, a linear layer, or a leanconv layer that counts itself."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    return isinstance(module, LeanConvLayer) and type(module).count_macs is not LeanConvLayer.count_macs


def example_input(model: nn.Module, input_size) -> torch.Tensor:
    """A zero input of ``input_size`` ((C, H, W): one image, or a full shape such as
    (B, C, H, W); a tensor is returned as it is) on the model's device, in its dtype."""
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), torch.empty(0))
    dtype = reference.dtype if reference.is_floating_point() else torch.get_default_dtype()
    if isinstance(input_size, torch.Tensor):
        return input_size.detach().to(reference.device)
    if (not isinstance(input_size, Sequence) or isinstance(input_size, str) or not input_size
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in input_size)):
        raise ValueError(f"input_size must be a tensor or a tuple of non-negative ints such as (3, 32, 32) or "
                         f"(1, 3, 32, 32), got {input_size!r}")
    size = tuple(input_size)
    if len(size) == 3:  # (C, H, W): one image
        size = (1, *size)
    return torch.zeros(size, dtype=dtype, device=reference.device)


def count(model: nn.Module, input_size, convention: str = "exact") -> CostReport:
    """MACs and parameters of ``model`` for one forward pass on ``input_size``.

    ``input_size`` is ``(C, H, W)`` (one image), a full input shape such as
    ``(B, C, H, W)``, or an example tensor. ``convention`` is ``"exact"`` or
    ``"paper"`` (see the module docstring). Returns a :class:`CostReport` with
    ``.macs``, ``.params``, ``.rows``; a layer called twice has two rows.

    The model is not modified: a copy runs the counting pass in eval mode
    under ``torch.no_grad``, with HetConv layers on their ``reference``
    backend and depthwise layers on ``torch`` (counting needs only shapes, so
    no backend measures or compiles).

    Example::

        >>> report = leanconv.count(models.create("vgg16_cifar"), (3, 32, 32), convention="paper")
        >>> report.macs  # 313,740,288 MACs, the HetConv paper's 313.74 M
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    example = example_input(model, input_size)
    params = count_parameters(model)
    try:
        runner = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - an uncopyable model is counted in place (flags restored below)
        runner = model
    flags = {module: module.training for module in runner.modules()}
    backends = {}
    for module in runner.modules():
        if isinstance(module, LeanConvLayer) and module.counting_backend is not None:
            backends[module] = module.backend
            module.backend = module.counting_backend
    report = CostReport(convention, tuple(example.shape), params=params)
    calls: dict[str, int] = {}

    def hook(module, args, output, name):
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        calls[name] = calls.get(name, 0) + 1
        label = name if calls[name] == 1 else f"{name} (call {calls[name]})"
        row = _row(label, module, args[0], output, convention)
        if row is not None:
            report.rows.append(row)

    handles = []
    for name, module in runner.named_modules():  # a shared module: one hook, one row per call
        if _counted(module):
            handles.append(module.register_forward_hook(lambda m, a, o, n=name or type(module).__name__: hook(m, a, o, n)))
    try:
        runner.eval()
        with torch.no_grad():
            runner(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
        for module, backend in backends.items():
            module.backend = backend
    return report

