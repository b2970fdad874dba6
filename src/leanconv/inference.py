"""The whole-network CPU inference path: :func:`optimize_for_inference`.

:func:`leanconv.fuse` folds BatchNorm and fuses ReLUs; the convolutions it leaves still go
through ``F.conv2d``, which sends small batch-1 calls to PyTorch's im2col kernel and
reorders oneDNN's weights on every call (:mod:`leanconv.ops.onednn`). This step puts a
:class:`~leanconv.layers.PrepackedConv2d` in place of every plain convolution of the model
(the unconverted stem and head, 1x1 downsamples, and the convolutions inside DSC, BSConv
and GWC+PWC layers), and where torch.fx can trace the model, moves the activation that
follows a convolution, and a residual addition (``relu(conv(x) + shortcut)``), into
oneDNN's post-ops. HetConv layers keep leanconv's own ``direct`` kernel. The standard and
the converted networks get the same treatment, so their timings stay comparable.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fuse import FuseReport, _occurrences, _replace_everywhere, fuse
from .graph import trace
from .layers import Conv2dReLU, DepthwiseConv2d, LeanConvLayer
from .layers.prepacked import PrepackedConv2d, why_not_prepackable
from .ops import onednn

__all__ = ["InferenceReport", "optimize_for_inference"]

# Modules whose forward is exactly nn.Conv2d's function (Conv2dReLU: then a ReLU); a
# subclass with a forward of its own (weight standardisation, a parametrization) is left.
_PLAIN_CONVS = {nn.Conv2d: None, Conv2dReLU: "relu", DepthwiseConv2d: None}

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu"}
_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class InferenceReport:
    """What :func:`optimize_for_inference` did: ``leanconv.fuse``'s report, the convolutions
    now prepacked for oneDNN, the activations and residual additions moved into them, the
    convolutions left as they were and why, and how the graph was read."""

    fuse: FuseReport
    prepacked: list[str] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    residuals: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    graph: str = ""

    def __str__(self) -> str:
        lines = [str(self.fuse), f"leanconv.optimize_for_inference: {len(self.prepacked)} convolution(s) prepacked "
                 f"for oneDNN; graph read by {self.graph}"]
        if self.activations:
            lines.append(f"  activations fused: {', '.join(self.activations)}")
        if self.residuals:
            lines.append(f"  residual additions fused: {', '.join(self.residuals)}")
        for name, reason in self.left:
            lines.append(f"  left {name}: {reason}")
        return "\n".join(lines)


def _prepack_convolutions(model: nn.Module, report: InferenceReport) -> nn.Module:
    """Every plain convolution becomes a PrepackedConv2d (a shared one stays shared)."""
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in done or not isinstance(module, nn.Conv2d) or isinstance(module, PrepackedConv2d):
            continue
        if type(module) not in _PLAIN_CONVS:
            done[id(module)] = module
            report.left.append((name or "(model)", f"{type(module).__name__}'s forward is its own "
                                                   "(only nn.Conv2d's function is prepacked)"))
            continue
        why = why_not_prepackable(module)
        if why:
            done[id(module)] = module
            report.left.append((name or "(model)", why))
            continue
        new = done[id(module)] = PrepackedConv2d.from_conv(module, activation=_PLAIN_CONVS[type(module)])
        report.prepacked.append(name or "(model)")
        if module is model:
            return new
        _replace_everywhere(model, module, new)
    return model


def _activation_of(node, modules: dict[str, nn.Module]) -> str | None:
    """The activation ``node`` applies to its single tensor input, or None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if module is None or module._forward_hooks or module._forward_pre_hooks:  # a hook would miss its call
            return None
        return _ACTIVATION_MODULES.get(type(module)) if len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        extra = set(node.kwargs) - {"inplace"}
        return _ACTIVATION_FUNCTIONS[node.target] if len(node.args) == 1 and not extra else None
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return _ACTIVATION_METHODS[node.target] if len(node.args) == 1 and not node.kwargs else None
    return None


def _is_plain_add(node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


# Python operators whose augmented assignment (`x += y`) changes a tensor in place in eager
# mode, but which torch.fx records out of place (its Proxy has no __iadd__ and the like).
_AUGMENTABLE = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
                operator.pow, operator.matmul, operator.and_, operator.or_, operator.xor, operator.lshift,
                operator.rshift)


def _augmented_assignment_read_later(graph) -> str | None:
    """The name of an operator node whose first operand is read again after it, or None. Were
    it written ``x += y``, eager mode would change ``x`` for those later reads and the traced
    graph would not: a model with such a node keeps its own forward (conservative: ``z = x + y``
    followed by a read of ``x`` is the same node)."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _AUGMENTABLE or not node.args:
            continue
        first = node.args[0]
        if hasattr(first, "users") and any(order[user] > order[node] for user in first.users if user is not node):
            return node.name
    return None


def _fuse_graph(model: nn.Module, report: InferenceReport, residual: bool) -> nn.Module:
    """Activations and residual additions moved into the PrepackedConv2d calls that feed
    them (torch.fx); the model itself where nothing moved or it cannot be traced."""
    import torch.fx

    try:
        graph = trace(model, leaves=(PrepackedConv2d,))
    except Exception as error:  # noqa: BLE001 - any tracing failure leaves the modules as they are
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        report.graph = f"modules only (torch.fx could not trace the model: {first_line[:160]})"
        return model
    aliased = _augmented_assignment_read_later(graph)
    if aliased:
        report.graph = (f"modules only (the torch.fx graph may differ from the model: `{aliased}` may be an "
                        "augmented assignment (`x += y`), which torch.fx records out of place, on a tensor read later)")
        return model
    report.graph = "torch.fx tracing"
    modules = dict(model.named_modules())
    occurrences = _occurrences(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def output_conv(node) -> PrepackedConv2d | None:
        """The PrepackedConv2d whose output is ``node``'s (a call of it, or of a leanconv
        layer that ends in it), free to take a post-op: called once, unshared, no
        activation yet, and nothing but one node reads the output."""
        if node.op != "call_module" or len(node.users) != 1 or calls[node.target] != 1:
            return None
        module = modules[node.target]
        conv = module.batchnorm_absorber() if isinstance(module, LeanConvLayer) else module
        if not isinstance(conv, PrepackedConv2d) or conv.activation is not None:
            return None
        if occurrences[id(module)] > 1 or occurrences[id(conv)] > 1:
            return None
        return conv

    def through_identities(node):
        """``node``'s producer past the nn.Identity calls (folded BatchNorms) that only
        pass it on, and those calls."""
        passed = []
        while (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.users) == 1
               and isinstance(modules[node.target], nn.Identity) and len(node.args) == 1 and not node.kwargs):
            passed.append(node)
            node = node.args[0]
        return node, passed

    def bypass(node, source, passed) -> None:
        """``node``'s readers read ``source`` instead; ``node`` and ``passed`` go."""
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        for identity in passed:
            graph.erase_node(identity)

    changed = False
    for node in list(graph.nodes):
        activation = _activation_of(node, modules)
        if activation is not None and isinstance(node.args[0], torch.fx.Node):
            source, passed = through_identities(node.args[0])
            conv = output_conv(source) if isinstance(source, torch.fx.Node) else None
            if conv is not None:
                conv.activation = activation
                bypass(node, source, passed)
                report.activations.append(f"{activation} -> {source.target}")
                changed = True
            continue
        if not residual or not _is_plain_add(node):
            continue
        operands = [(argument, *through_identities(argument)) for argument in reversed(node.args)]
        candidates = [(argument, source, passed) for argument, source, passed in operands
                      if isinstance(source, torch.fx.Node) and source.op == "call_module"
                      and isinstance(modules[source.target], PrepackedConv2d) and len(source.args) == 1
                      and not source.kwargs and output_conv(source) is not None]
        if not candidates:
            continue
        argument, source, passed = candidates[0]
        other = node.args[0] if argument is node.args[1] else node.args[1]
        if not isinstance(other, torch.fx.Node) or other is argument:
            continue
        if node.target == "add_" and other is node.args[0] and len(other.users) > 1:
            continue  # `shortcut.add_(conv(x))` changes a tensor that is read elsewhere: the post-op would not
        order = {n: i for i, n in enumerate(graph.nodes)}
        if order[other] > order[source]:
            other.append(source)  # its inputs come earlier still; its one reader (an Identity or the add) later
        conv = modules[source.target]
        source.args = (source.args[0], other)
        bypass(node, source, passed)
        text = f"add -> {source.target}"
        follower = next(iter(source.users)) if len(source.users) == 1 else None
        activation = _activation_of(follower, modules) if follower is not None else None
        if activation is not None:
            conv.activation = activation
            bypass(follower, source, [])
            text = f"add, {activation} -> {source.target}"
        report.residuals.append(text)
        changed = True
    if not changed:
        return model
    graph.lint()
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__).eval()


def optimize_for_inference(model: nn.Module, *, inplace: bool = False, residual: bool = True,
                           return_report: bool = False):
    """An inference copy of ``model`` whose convolutions run on the CPU through oneDNN with
    prepacked weights (module docstring).

    Steps: :func:`leanconv.fuse` (BatchNorm folded, ReLUs fused, exact HetConv); every
    ``nn.Conv2d`` (also the ones inside leanconv's separable layers, and a
    :class:`~leanconv.layers.Conv2dReLU`) becomes a
    :class:`~leanconv.layers.PrepackedConv2d` sharing its parameters; then, where torch.fx
    can trace the model, a ReLU, ReLU6 or SiLU that only reads a convolution's output
    moves into it, and with ``residual`` (the default) an addition of a convolution's
    output and another tensor (``out += shortcut``), with the activation after it, too:
    the result is then a ``torch.fx.GraphModule``, else ``model``'s own class.

    ``model`` must be in eval mode. The result computes ``model``'s function to float32
    rounding; its fast path runs in eager CPU float32 calls without autograd (under
    ``torch.inference_mode()`` or ``torch.no_grad()``), on channels-last inputs for the
    best speed. Traced, exported, compiled or differentiated calls run standard operators,
    so ``leanconv.export`` and ``torch.compile`` take the result too (compile the output
    of :func:`leanconv.fuse` instead: inductor packs weights itself). Weights changed in
    place are packed again on the next call.

    Returns the optimized model, or ``(model, InferenceReport)`` with ``return_report``.

    Example::

        fast = leanconv.optimize_for_inference(model.eval())
        with torch.inference_mode():
            y = fast(x.contiguous(memory_format=torch.channels_last))
    """
    if not onednn.available():
        raise RuntimeError("optimize_for_inference needs a torch built with oneDNN (torch.backends.mkldnn)")
    target, fuse_report = fuse(model, inplace=inplace, return_report=True)
    report = InferenceReport(fuse=fuse_report)
    target = _prepack_convolutions(target, report)
    target = _fuse_graph(target, report, residual)
    target.eval()
    return (target, report) if return_report else target
