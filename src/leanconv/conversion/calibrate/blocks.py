"""Block reconstruction: after the per-layer fits, the parameters of each block that
holds replaced layers are optimised so that what the block passes on (its output
after the residual addition and the activation, whatever they are) matches the
teacher's block, on the inputs the converted network actually gives it.

Per-layer least squares fits each convolution's output; in a residual block the
second convolution's output goes through a BatchNorm into an addition and a
ReLU, and a chain of blocks compounds what each per-layer fit leaves. Block-wise
reconstruction, as post-training quantization does it (Li et al., "BRECQ:
Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR
2021, https://arxiv.org/abs/2102.05426), fits the quantity that matters.

**Blocks** (:func:`find_blocks`) come from the module tree alone (no tracing: any
``nn.Module`` works). From each replaced layer, climb to the highest enclosing
module that is not a container (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``) nor the model, and holds at most ``block_layers`` replaced
layers: a ResNet's ``BasicBlock``/``Bottleneck``, a DenseNet's dense layer, a
user's ``Block``, or the layer itself. Inside an ``nn.Sequential`` consecutive
such modules form one block while it holds at most ``block_layers`` replaced
layers (a CIFAR ResNet-20's stage of three basic blocks, three of ResNet-56's
nine, six convolutions of a VGG), with the siblings after them that hold no
computation of their own (normalisation layers and parameter-free modules:
BatchNorm, ReLU, pooling); a sibling with a computation of its own (an
unreplaced convolution, a linear layer) ends the block. A block is one module
called on its inputs, or a run of ``nn.Sequential`` siblings each fed the
previous one's output. Larger blocks let a later layer compensate an earlier
one's error: on a CIFAR ResNet-20, HetConv P=4, blocks of six layers (a stage)
reached 65.1% against 63.3% with blocks of two (the basic blocks), for a dense
teacher at 70.8% (``docs/compression.md``).

**Reconstruction** (:func:`reconstruct`) of one block: its inputs in the student
and its outputs in the teacher, on the calibration images (at most
``block_cache_mb`` of them), are cached; a seeded eighth of the images is held
out. ``block_steps`` steps of Adam (mini-batches of ``block_batch_size`` images)
on the relative squared error of the block's output train every floating
parameter of the block (the replaced layers, its BatchNorms' affine parameters,
an unreplaced shortcut) except parameters that a module outside the block also
uses; BatchNorms keep their running statistics (eval mode). Each tensor's step
size is ``block_lr`` times its root-mean-square value (at least 1e-3), as
Adafactor's relative step (Shazeer and Stern, https://arxiv.org/abs/1804.04235):
a VGG's weights are 2-5x smaller than a ResNet-20's, and one absolute rate that
suited the ResNet destroyed the VGG's fits. The rate rises linearly over the
first tenth of the steps (Adam's first steps move every weight by about the step
size, which undid the least-squares start), then decays as a cosine. The
held-out error is measured ten times during the optimisation and the best
parameters seen are kept (early stopping: a VGG block of 256-channel layers on
4x4 maps fitted its 896 images to 0.012 while its held-out error rose), and only
if they beat the per-layer fits. The report gives the held-out relative error
with the transferred weights, after the per-layer fits and after the block's
optimisation (the best of the ten: the held-out images chose it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...layers import LeanConvLayer
from .moments import Feed, capture
from .settings import BlockFit, CalibrationSettings

__all__ = ["Block", "BlockCache", "block_error", "block_feed", "cache_block", "find_blocks", "reconstruct", "split"]

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
NORMALISATIONS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class Block:
    """A run of modules (by name) whose last output the teacher's must match; ``layers``
    are the indices of the replaced layers it holds (in calibration's list)."""

    members: list[str]
    layers: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.members[0] if len(self.members) == 1 else f"{self.members[0]}..{self.members[-1]}"


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _holds_computation(module: nn.Module) -> bool:
    """True when a module has parameters outside normalisation layers (a convolution, a linear layer...)."""
    return any(p is not None for m in module.modules() if not isinstance(m, NORMALISATIONS)
               for p in m.parameters(recurse=False))


def find_blocks(model: nn.Module, layers: list[nn.Module], block_layers: int) -> list[Block]:
    """The blocks of ``model`` that hold ``layers`` (replaced layers, in execution order), in
    the order of their first layer (see the module docstring). A layer that is the model itself
    has no block."""
    names = {id(module): name for name, module in model.named_modules()}
    replaced = {id(layer) for layer in layers}

    def count(module: nn.Module) -> int:
        return sum(id(m) in replaced for m in module.modules())

    units: dict[str, list[int]] = {}  # the highest module of each layer that is not a container
    for index, layer in enumerate(layers):
        name = names.get(id(layer), "")
        if not name:
            continue
        while True:
            parent_name = _parent(name)
            parent = model.get_submodule(parent_name)
            if not parent_name or isinstance(parent, CONTAINERS) or count(parent) > block_layers:
                break
            name = parent_name
        units.setdefault(name, []).append(index)

    blocks: list[Block] = []
    sequences = []
    for name, indices in units.items():
        if isinstance(model.get_submodule(_parent(name)), nn.Sequential):
            if _parent(name) not in sequences:
                sequences.append(_parent(name))
        else:
            blocks.append(Block([name], list(indices)))
    for sequence in sequences:  # runs of consecutive children, at most block_layers layers each
        prefix = sequence + "." if sequence else ""
        run, held = None, 0
        for child, module in model.get_submodule(sequence).named_children():
            name = prefix + child
            if name in units:
                if run is None or held + count(module) > block_layers:
                    run, held = Block([], []), 0
                    blocks.append(run)
                run.members.append(name)
                run.layers.extend(units[name])
                held += count(module)
            elif run is not None and not _holds_computation(module) and not count(module):
                run.members.append(name)  # BatchNorm, activation, pooling after the run's last layer
            else:
                run = None
    for block in blocks:
        block.layers.sort()
    return sorted(blocks, key=lambda block: block.layers[0])


# ------------------------------------------------------------------ the cache
class BlockCache:
    """The block's inputs in the student and outputs in the teacher for the calibration
    images: ``inputs`` (one tensor per positional argument, batch first), ``kwargs``
    (constant keyword arguments) and ``targets``; empty with ``reason`` when the
    block cannot be reconstructed. When every calibration batch fits the budget with
    them, also the teacher's inputs of the block (``teacher_inputs``, ``teacher_kwargs``)
    and the batches' sizes: then the layer fits inside the block start from the cache
    (:func:`block_feed`)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict = {}
        self.targets: torch.Tensor | None = None
        self.teacher_inputs: list[torch.Tensor] | None = None
        self.teacher_kwargs: dict = {}
        self.batch_sizes: list[int] = []  # images of each cached calibration batch
        self.calls = 0  # calls of the block's first module per forward pass
        self.images = 0
        self.reason = ""

    def __len__(self) -> int:
        return 0 if self.targets is None else len(self.targets)


def cache_block(teacher: nn.Module, student: nn.Module, block: Block, batches, device, dtype,
                settings: CalibrationSettings) -> BlockCache:
    """The block's student inputs and teacher outputs (see :class:`BlockCache`), at most
    ``block_cache_mb`` MiB of them (whole calibration batches, in order)."""
    cache = BlockCache()
    first, last = student.get_submodule(block.members[0]), teacher.get_submodule(block.members[-1])
    teacher_first = teacher.get_submodule(block.members[0])
    inputs: list[tuple] = []
    targets: list[torch.Tensor] = []
    teacher_inputs: list[tuple] | None = []
    budget, used, used_teacher, calls = settings.block_cache_mb * 2 ** 20, 0, 0, None

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    for images in batches:
        images = images.to(device=device, dtype=dtype)
        given = capture(lambda: student(images), first, True, calls)
        produced = capture(lambda: teacher(images), last, False, calls)
        calls = len(given)
        if not given or len(produced) != len(given):
            cache.reason = "not reconstructed: the block did not run on the calibration images" if not given else (
                f"not reconstructed: its first module ran {len(given)} times and its last {len(produced)} times")
            return cache
        for (args, kwargs), output in zip(given, produced):
            why = _why_not_batched(args, kwargs, output, len(images))
            if why:
                cache.reason = f"not reconstructed: {why}"
                return cache
            if not inputs:
                cache.kwargs = kwargs
            inputs.append(args)
            targets.append(output)
            used += size(args) + size([output])
        seen = capture(lambda: teacher(images), teacher_first, True, 1) if teacher_inputs is not None else []
        if len(seen) == 1 and calls == 1:
            (args, kwargs), = seen
            teacher_inputs.append(args)
            cache.teacher_kwargs = kwargs
            used_teacher += size(args)
        if teacher_inputs is not None and (len(seen) != 1 or calls != 1 or used + used_teacher > budget):
            teacher_inputs, used_teacher = None, 0  # the block step's images come first
        cache.images += len(images)
        cache.batch_sizes.append(len(images))
        if used >= budget:
            break
    cache.calls = calls
    cache.inputs = [torch.cat(column) for column in zip(*inputs)]
    cache.targets = torch.cat(targets)
    if teacher_inputs is not None:
        cache.teacher_inputs = [torch.cat(column) for column in zip(*teacher_inputs)]
    return cache


def block_feed(teacher: nn.Module, student: nn.Module, block: Block, cache: BlockCache,
               batches: int) -> Feed | None:
    """The block's modules run from the cached inputs, batch by batch (see
    :class:`~leanconv.conversion.calibrate.moments.Feed`), or None when the cache does not
    hold every one of the ``batches`` calibration batches with the teacher's inputs, or the
    block runs more than once a pass."""
    if cache.reason or cache.teacher_inputs is None or cache.calls != 1 or len(cache.batch_sizes) != batches:
        return None
    ends = torch.tensor(cache.batch_sizes).cumsum(0).tolist()
    starts = [0, *ends[:-1]]

    def on_cache(model: nn.Module, inputs: list[torch.Tensor], kwargs: dict):
        modules = [model.get_submodule(name) for name in block.members]
        return lambda b: _run(modules, [x[starts[b]:ends[b]] for x in inputs], kwargs)

    return Feed(on_cache(teacher, cache.teacher_inputs, cache.teacher_kwargs),
                on_cache(student, cache.inputs, cache.kwargs), batches)


def _why_not_batched(args: tuple, kwargs: dict, output, batch: int) -> str:
    if not args or not all(isinstance(a, torch.Tensor) and a.dim() and len(a) == batch for a in args):
        return "its inputs are not tensors with the images' batch dimension"
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return "it takes tensors as keyword arguments"
    if not isinstance(output, torch.Tensor) or not output.dim() or len(output) != batch:
        return "its output is not a tensor with the images' batch dimension"
    return ""


# ------------------------------------------------------------------ the optimisation
def _run(modules: list[nn.Module], inputs: list[torch.Tensor], kwargs: dict) -> torch.Tensor:
    out = modules[0](*inputs, **kwargs)
    for module in modules[1:]:
        out = module(out)
    return out


def _relative_error(modules, cache: BlockCache, index: torch.Tensor, batch_size: int) -> float:
    error = total = 0.0
    with torch.no_grad():
        for chunk in index.split(batch_size):
            out = _run(modules, [x[chunk] for x in cache.inputs], cache.kwargs).double()
            target = cache.targets[chunk].double()
            error += (out - target).square().sum().item()
            total += target.square().sum().item()
    return math.sqrt(error / total) if total > 0 else 0.0


def _trainable(model: nn.Module, block: Block) -> list[nn.Parameter]:
    """The block's floating parameters that no module outside the block uses."""
    def within(name: str) -> bool:
        return any(name == member or name.startswith(member + ".") for member in block.members)

    # every place a module is attached: a module shared with the rest of the model is outside
    outside = {id(p) for name, m in model.named_modules(remove_duplicate=False) if not within(name)
               for p in m.parameters(recurse=False)}
    seen, parameters = set(), []
    for name in block.members:
        for p in model.get_submodule(name).parameters():
            if p.is_floating_point() and id(p) not in outside and id(p) not in seen:
                seen.add(id(p))
                parameters.append(p)
    return parameters


def split(cache: BlockCache, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitting, held-out) sample indices: a seeded eighth held out (every sample in both
    when there are fewer than 16)."""
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed))
    if len(cache) < 16:
        return order, order
    held = len(cache) // 8
    return order[held:], order[:held]


def block_error(student: nn.Module, block: Block, cache: BlockCache, index: torch.Tensor,
                settings: CalibrationSettings) -> float:
    """The block's relative output error against the teacher's on the cached samples ``index``."""
    modules = [student.get_submodule(name) for name in block.members]
    return _relative_error(modules, cache, index, settings.batch_size)


WARMUP = 0.1  # fraction of the steps over which the learning rate rises linearly from zero
CHECKS = 10  # held-out evaluations during the optimisation: the best parameters seen are kept
RMS_FLOOR = 1e-3  # a tensor's scale for its step size is at least this (Adafactor's epsilon_2)


def _rate(step: int, steps: int) -> float:
    """The learning rate's factor at ``step``: linear warm-up, then cosine decay to zero."""
    warm = max(1, round(WARMUP * steps))
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))


def reconstruct(student: nn.Module, block: Block, cache: BlockCache, fit: BlockFit, fitting: torch.Tensor,
                held_out: torch.Tensor, settings: CalibrationSettings, seed: int) -> None:
    """Optimise the block's parameters (see the module docstring) in place; fills ``fit``."""
    modules = [student.get_submodule(name) for name in block.members]
    parameters = _trainable(student, block)
    if not parameters:
        fit.method = "not reconstructed: no parameter of the block is its own"
        return
    modules_inside = (m for name in block.members for m in student.get_submodule(name).modules())
    if not any(isinstance(m, LeanConvLayer) for m in modules_inside):
        fit.method = "not reconstructed: holds no leanconv layer"
        return
    start = time.perf_counter()
    saved = [p.detach().clone() for p in parameters]
    flags = [p.requires_grad for p in parameters]
    generator = torch.Generator().manual_seed(seed)
    steps = settings.block_steps
    batch = min(settings.block_batch_size, len(fitting))
    every = max(1, steps // CHECKS)
    # each tensor's step size is block_lr times its scale (Adafactor's relative step)
    sizes = [settings.block_lr * max(p.detach().double().square().mean().sqrt().item(), RMS_FLOOR) for p in parameters]
    best_error, best = math.inf, saved  # a loss that diverges (NaN) is never best: the fits stay
    with torch.enable_grad():
        for p in parameters:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam([{"params": [p], "lr": size} for p, size in zip(parameters, sizes)])
        try:
            for step in range(steps):
                for group, size in zip(optimizer.param_groups, sizes):
                    group["lr"] = size * _rate(step, steps)
                chosen = fitting[torch.randint(len(fitting), (batch,), generator=generator)]
                target = cache.targets[chosen]
                out = _run(modules, [x[chosen] for x in cache.inputs], cache.kwargs)
                loss = (out - target).square().sum() / target.square().sum().clamp(min=1e-12)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if (step + 1) % every == 0 or step + 1 == steps:
                    error = _relative_error(modules, cache, held_out, settings.batch_size)
                    if error < best_error:
                        best_error, best = error, [p.detach().clone() for p in parameters]
        finally:
            for p, flag in zip(parameters, flags):
                p.requires_grad_(flag)
    with torch.no_grad():
        for p, value in zip(parameters, best):
            p.copy_(value)
    fit.error_block = best_error if best is not saved else _relative_error(modules, cache, held_out,
                                                                          settings.batch_size)
    fit.error_block_fitting = _relative_error(modules, cache, fitting, settings.batch_size)
    fit.seconds = time.perf_counter() - start
    fit.method = f"{steps} Adam steps on {len(parameters)} parameter tensors"
    before = fit.error_layers if fit.error_layers is not None else fit.error_transfer
    if before is not None and not fit.error_block < before:
        with torch.no_grad():
            for p, value in zip(parameters, saved):
                p.copy_(value)
        fit.method += " (not kept: no lower held-out error)"
        fit.kept = False
    else:
        fit.kept = True
