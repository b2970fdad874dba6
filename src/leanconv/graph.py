"""What follows a layer in a model: one analysis for ``leanconv.fuse`` (a BatchNorm or ReLU
to fold in) and data-aware calibration (the BatchNorm whose statistics a fit changes, and
whether only a ReLU reads it).

:func:`followers` finds, for each module call whose output only a follower module (a
``BatchNorm2d``, or a ``ReLU``) reads, that follower. Two ways to see the graph:

* without data (``fuse``): torch.fx traces the model with leanconv layers as leaves; the
  follower's only input is a module call used by nothing else, both modules called once
  (through modules of the ``skip`` types). A model torch.fx cannot trace is read in
  ``nn.Sequential`` order instead (consecutive children only);
* with an example input (calibration): one forward pass with hooks on the layers and
  BatchNorms, and every torch function watched, so functional ReLUs, in place or not,
  count; every output of a layer goes into one BatchNorm (with running statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .layers import LeanConvLayer

__all__ = ["Follower", "followers", "trace"]


@dataclass(frozen=True)
class Follower:
    """``follower`` (a module path) reads the output of ``layer`` (a module path) and nothing
    else does; ``relu_only``: only a ReLU reads the follower's output (None: not known, the
    analysis without data does not look)."""

    layer: str
    follower: str
    relu_only: bool | None = None


def followers(model: nn.Module, *, follower=nn.BatchNorm2d, skip=(), layers=None,
              example: torch.Tensor | None = None) -> tuple[list[Follower], str]:
    """The (layer, follower) pairs of ``model`` and how they were found (module docstring).
    With ``example`` (a batch the model takes), ``layers`` (modules) are the layers asked
    about and ``follower`` must be ``nn.BatchNorm2d``."""
    if example is not None:
        if follower is not nn.BatchNorm2d:
            raise ValueError("followers: with an example input, only BatchNorm2d followers are observed")
        return _observed(model, list(layers or []), example), "a forward pass on the calibration images"
    pairs, how = _static(model, follower, skip)
    return [Follower(layer, after) for layer, after in pairs], how


# ------------------------------------------------------------------ without data
def trace(model: nn.Module, leaves: tuple[type, ...] = ()):
    """``model``'s torch.fx graph with leanconv layers (and modules of the types ``leaves``)
    as leaf calls; raises what torch.fx raises where it cannot trace."""
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            if isinstance(module, (LeanConvLayer, *leaves)):
                return True
            return super().is_leaf_module(module, qualified_name)

    return Tracer().trace(model)


def _pairs_by_fx(model: nn.Module, follower=nn.BatchNorm2d, skip=()) -> list[tuple[str, str]]:
    """(conv path, follower path) for each ``follower`` module (BatchNorm2d) whose input
    is the output of a module call used by nothing else, through modules of the types
    ``skip`` (each used once), with both modules called once (torch.fx)."""
    graph = trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), follower):
            continue
        source = node.args[0] if node.args else None
        while (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
               and isinstance(model.get_submodule(source.target), skip) and source.args):
            source = source.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[source.target] == 1 and calls[node.target] == 1 and len(node.args) == 1 and not node.kwargs:
            pairs.append((source.target, node.target))
    return pairs


def _pairs_by_sequential(model: nn.Module, follower=nn.BatchNorm2d, skip=()) -> list[tuple[str, str]]:
    """(conv path, follower path) for children of plain nn.Sequential containers, the
    follower after the conv with only modules of the types ``skip`` between them."""
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            continue
        children = list(module.named_children())
        prefix = f"{name}." if name else ""
        for index, (second_name, second) in enumerate(children):
            if not isinstance(second, follower):
                continue
            before = index - 1
            while before >= 0 and isinstance(children[before][1], skip):
                before -= 1
            if before >= 0:
                pairs.append((prefix + children[before][0], prefix + second_name))
    return pairs


def _static(model: nn.Module, follower, skip=()) -> tuple[list[tuple[str, str]], str]:
    try:
        return _pairs_by_fx(model, follower, skip), "torch.fx tracing"
    except Exception as error:  # noqa: BLE001 - any tracing failure falls back
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (_pairs_by_sequential(model, follower, skip),
                f"nn.Sequential order (torch.fx could not trace the model: {first_line[:160]})")


# ----------------------------------------------------------- with an example input
_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_INPLACE_RELUS = {F.relu_, torch.relu_, torch.Tensor.relu_}


def _tensors_in(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    return []


class _Readers(TorchFunctionMode):
    """Records every torch function that reads a watched tensor (``watched``:
    key -> tensors) into ``readers[key]`` ("relu" for a ReLU). A tensor a
    ReLU overwrote in place stops being watched: later readers read the ReLU's
    output."""

    def __init__(self, watched: dict[int, list]) -> None:
        super().__init__()
        self.watched = watched
        self.readers: dict[int, set] = {key: set() for key in watched}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors_in(args) + _tensors_in(kwargs)
        for key, seen in self.watched.items():
            for out in [out for out in seen if any(t is out for t in tensors)]:
                relu = func in _RELUS
                self.readers[key].add("relu" if relu else func)
                inplace = func in _INPLACE_RELUS or (func is F.relu and (kwargs.get("inplace") or args[1:2] == (True,)))
                if relu and inplace:
                    seen.remove(out)
        return func(*args, **kwargs)


def _observed(student: nn.Module, layers: list[nn.Module], images: torch.Tensor) -> list[Follower]:
    """For each layer whose every output goes straight into one BatchNorm2d:
    (name, bn, whether that BatchNorm's output is read only by a ReLU: a
    module or a function, in place or not)."""
    outputs: dict[int, list] = {id(layer): [] for layer in layers}
    consumers: dict[int, set] = {id(layer): set() for layer in layers}
    names = {id(module): name for name, module in student.named_modules()}
    bns = {id(m): m for m in student.modules() if isinstance(m, nn.BatchNorm2d)}
    bn_outputs: dict[int, list] = {key: [] for key in bns}
    handles = [layer.register_forward_hook(lambda m, a, out: outputs[id(m)].append(out)) for layer in layers]

    def check(bn, args):
        for key, seen in outputs.items():
            if any(args[0] is out for out in seen):
                consumers[key].add(id(bn))

    handles += [bn.register_forward_pre_hook(check) for bn in bns.values()]
    handles += [bn.register_forward_hook(lambda m, a, out: bn_outputs[id(m)].append(out)) for bn in bns.values()]
    readers = _Readers(bn_outputs)
    try:
        with torch.no_grad(), readers:
            student(images)
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for layer in layers:
        chosen = consumers[id(layer)]
        bn = bns[next(iter(chosen))] if len(chosen) == 1 else None
        if bn is not None and bn.track_running_stats and bn.running_mean is not None:
            found.append(Follower(names.get(id(layer), ""), names.get(id(bn), "batchnorm"),
                                  readers.readers[id(bn)] == {"relu"}))
    return found
