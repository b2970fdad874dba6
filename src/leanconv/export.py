"""Deployment: ONNX (checked with onnxruntime), TorchScript and torch.export.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.

Before export a model is *prepared* (:func:`prepare_for_export`): an eval-mode
copy, BatchNorm folded by :func:`leanconv.fuse` when it can be, and every
``HetConv2d`` replaced by a form made only of standard operators:

* ``"split"`` (default): a grouped KxK convolution (groups = P) plus a 1x1
  convolution whose weight is zero on each filter's own KxK channels, summed:
  three ONNX nodes (Conv, Conv, Add) for the blocked layout, plus two Gathers
  for the shifted layout. Ho*Wo*N*(M/P*K*K + M) MACs: HetConv's count plus the
  N*M/P zero products, against N*M*K*K for the dense form;
* ``"dense"``: one Conv with the materialised (N, M, K, K) weight (what ``p=1``
  always uses, since it *is* a standard convolution).

No loop over filters or channels is ever exported.

Which torch.onnx path: torch 2.13's ``torch.onnx.export`` defaults to
``dynamo=True`` (the torch.export-based exporter, needs ``onnxscript``); that is
the path used here. The legacy TorchScript-based exporter (``dynamo=False``)
still works in 2.13 but is deprecated and warns; pass ``dynamo=False`` to use it.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from . import accounting
from .layers import LeanConvLayer
from .layers.hetconv_export import HetConvExportForm

__all__ = [
    "HetConvExportForm",
    "OnnxExport",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "prepare_for_export",
    "run_onnx",
]

HETCONV_FORMS = ("split", "dense")
DEFAULT_OPSET = 18


def _export_forms(model: nn.Module, hetconv_form: str) -> nn.Module:
    """Each leanconv layer as its :meth:`~leanconv.layers.LeanConvLayer.export_form` (a
    shared layer once), containers' children in turn."""
    built: dict[int, nn.Module] = {}

    def form(module: nn.Module) -> nn.Module:
        if id(module) not in built:
            built[id(module)] = module.export_form(hetconv_form=hetconv_form)
        return built[id(module)]

    if isinstance(model, LeanConvLayer):
        model = form(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, LeanConvLayer):
                parent._modules[name] = form(child)
    return model


def prepare_for_export(model: nn.Module, *, hetconv_form: str = "split", fuse: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` made of exportable standard operators:
    BatchNorm folded (``fuse=True``, via :func:`leanconv.fuse`), each
    HetConv2d in ``hetconv_form`` ("split" or "dense"; see the module docstring)
    and each DepthwiseConv2d as a plain nn.Conv2d.
    Outputs equal ``model.eval()``'s within float32 rounding."""
    if hetconv_form not in HETCONV_FORMS:
        raise ValueError(f"hetconv_form must be one of {HETCONV_FORMS}, got {hetconv_form!r}")
    prepared = copy.deepcopy(model).eval()
    if fuse:
        from .fuse import fuse as fuse_model

        prepared = fuse_model(prepared, inplace=True)
    return _export_forms(prepared, hetconv_form).eval()


def _example(model: nn.Module, example_input, input_size) -> torch.Tensor:
    if example_input is not None:
        return example_input
    if input_size is None:
        raise ValueError("give example_input (a tensor) or input_size=(C, H, W) / (B, C, H, W)")
    zeros = accounting.example_input(model, input_size)  # validates input_size; the model's device and dtype
    return torch.randn(zeros.shape, generator=torch.Generator().manual_seed(0)).to(zeros)


@dataclass
class OnnxExport:
    """Result of :func:`export_onnx`: the file, its opset, the operator
    histogram of its graph, and (with ``check``) the largest absolute
    difference between onnxruntime's and PyTorch's outputs."""

    path: str
    opset: int
    node_counts: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float | None = None
    tolerance: float | None = None

    @property
    def num_nodes(self) -> int:
        return sum(self.node_counts.values())

    def __str__(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.node_counts.items()))
        text = f"{self.path}: ONNX opset {self.opset}, {self.num_nodes} nodes ({ops})"
        if self.max_abs_diff is not None:
            text += f"\nonnxruntime vs PyTorch: max |diff| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}): OK"
        return text


def _require(module: str, extra: str = "onnx"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(
            f"{module} is not installed; install the extra: pip install 'leanconv[{extra}]' ({error})"
        ) from error


def run_onnx(path: str, input: torch.Tensor) -> torch.Tensor:
    """Run an ONNX file on ``input`` with onnxruntime's CPU provider."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (output,) = session.run(None, {name: input.detach().cpu().numpy()})[:1]
    return torch.from_numpy(output)


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    path: str | os.PathLike | None = None,
    *,
    input_size: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    hetconv_form: str = "split",
    fuse: bool = True,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    dynamo: bool = True,
) -> OnnxExport:
    """Export ``model`` (prepared by :func:`prepare_for_export`) to ONNX at ``path``.

    The three export functions take (model, example input, path); give
    ``example_input=None`` and ``input_size=(C, H, W)`` for a random input.

    ``check`` runs the file in onnxruntime on ``example_input`` and compares
    with ``model.eval()`` in PyTorch: a RuntimeError when
    max|ort - torch| > atol + rtol * max|torch|. ``dynamic_batch`` makes the
    batch dimension symbolic. Needs ``onnx``, ``onnxruntime`` and ``onnxscript``
    (``pip install 'leanconv[onnx]'``).

    Example::

        result = leanconv.export.export_onnx(model, None, "model.onnx", input_size=(3, 32, 32))
        print(result)            # nodes by type and the onnxruntime check
    """
    if path is None:
        raise ValueError("export_onnx needs path, the ONNX file to write (its third argument), got None")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    onnx = _require("onnx")
    if dynamo:
        _require("onnxscript")
    x = _example(model, example_input, input_size)
    prepared = prepare_for_export(model, hetconv_form=hetconv_form, fuse=fuse)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kwargs: dict = dict(opset_version=opset, input_names=["input"], output_names=["output"])
    if dynamo:
        kwargs.update(dynamo=True, external_data=False, verbose=False)
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC},)
    else:
        kwargs.update(dynamo=False)
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(prepared, (x,), path, **kwargs)
    except Exception as error:  # noqa: BLE001 - one clear error
        raise RuntimeError(f"ONNX export failed ({'dynamo' if dynamo else 'TorchScript'} exporter): {error}") from error
    graph = onnx.load(path)
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    opset_used = max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    result = OnnxExport(path, opset_used, counts)
    if check:
        with torch.no_grad():
            reference = copy.deepcopy(model).eval()(x)
        output = run_onnx(path, x).to(reference.dtype)
        difference = (output - reference.detach().cpu()).abs().max().item() if output.numel() else 0.0
        tolerance = atol + rtol * (reference.abs().max().item() if reference.numel() else 0.0)
        result.max_abs_diff, result.tolerance = difference, tolerance
        if tuple(output.shape) != tuple(reference.shape) or not difference <= tolerance:
            raise RuntimeError(
                f"onnxruntime output differs from PyTorch: shape {tuple(output.shape)} vs {tuple(reference.shape)}, "
                f"max |diff| = {difference:.3g} > tolerance {tolerance:.3g}"
            )
    return result


def export_torchscript(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    path: str | os.PathLike | None = None,
    *,
    input_size: Sequence[int] | None = None,
    hetconv_form: str = "split",
    fuse: bool = True,
):
    """``torch.jit.trace`` of the prepared model (saved to ``path`` if given).

    Tracing records one input shape's graph: Python control flow on shapes is
    frozen. TorchScript is deprecated in recent torch; prefer
    :func:`export_program`. A RuntimeError says why when tracing fails."""
    x = _example(model, example_input, input_size)
    prepared = prepare_for_export(model, hetconv_form=hetconv_form, fuse=fuse)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(prepared, (x,), check_trace=False)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"torch.jit.trace failed on the prepared model: {error}") from error
    if path is not None:
        traced.save(os.fspath(path))
    return traced


def export_program(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    path: str | os.PathLike | None = None,
    *,
    input_size: Sequence[int] | None = None,
    hetconv_form: str = "split",
    fuse: bool = True,
    dynamic_batch: bool = False,
):
    """``torch.export.export`` of the prepared model (an ExportedProgram,
    saved with ``torch.export.save`` if ``path`` is given). A RuntimeError says
    why when export fails."""
    x = _example(model, example_input, input_size)
    prepared = prepare_for_export(model, hetconv_form=hetconv_form, fuse=fuse)
    dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
    try:
        program = torch.export.export(prepared, (x,), dynamic_shapes=dynamic_shapes)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"torch.export.export failed on the prepared model: {error}") from error
    if path is not None:
        torch.export.save(program, os.fspath(path))
    return program
