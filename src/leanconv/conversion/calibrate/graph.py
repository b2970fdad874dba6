"""Graph analysis for calibration: which BatchNorm a replaced layer feeds, and whether
only a ReLU reads that BatchNorm's output (seen by watching every torch function during
one forward pass, so functional ReLUs count too)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["batchnorm_after"]

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


def batchnorm_after(student: nn.Module, layers: list[nn.Module], images: torch.Tensor) -> dict[int, tuple]:
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
    found = {}
    for layer in layers:
        chosen = consumers[id(layer)]
        bn = bns[next(iter(chosen))] if len(chosen) == 1 else None
        if bn is not None and bn.track_running_stats and bn.running_mean is not None:
            found[id(layer)] = (names.get(id(bn), "batchnorm"), bn, readers.readers[id(bn)] == {"relu"})
    return found
