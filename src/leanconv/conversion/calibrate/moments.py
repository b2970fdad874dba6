"""The calibration data and its moments: image batches, where a layer's passes start
(:class:`Feed`), forward passes stopped at a layer, the sampled input patches and
teacher outputs, and their float64 moments (:mod:`leanconv.ops.least_squares` states
them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Feed", "Moments", "as_batches", "capture", "collect", "features_of", "image_feed", "patch_rows",
           "run_until", "samples"]

def as_batches(calibration, batch_size: int) -> list[torch.Tensor]:
    """``calibration`` (a (B, C, H, W) tensor, or an iterable of such tensors
    or of (images, labels) pairs) as a list of image batches of at most
    ``batch_size``; the iterable is read once."""
    if isinstance(calibration, torch.Tensor):
        tensors = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        tensors = [item[0] if isinstance(item, (tuple, list)) else item for item in calibration]
    else:
        raise TypeError(f"calibration must be a tensor of images or an iterable of batches, got "
                        f"{type(calibration).__name__}")
    batches = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or not tensor.is_floating_point():
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"calibration batches must be floating (B, C, H, W) image tensors, got {got}")
        batches.extend(tensor.split(batch_size))
    batches = [b for b in batches if len(b)]
    if not batches:
        raise ValueError("calibration holds no images")
    if len({tuple(b.shape[1:]) for b in batches}) != 1:
        raise ValueError(f"calibration images must all have one (C, H, W) size, got "
                         f"{sorted({tuple(b.shape[1:]) for b in batches})}")
    return batches


@dataclass
class Feed:
    """Where a layer's calibration passes start, batch by batch: ``teacher(b)`` and
    ``student(b)`` run one forward pass on calibration batch ``b``, the whole networks
    from the images (:func:`image_feed`) or, inside a block, the block's modules from
    its cached inputs (:func:`leanconv.conversion.calibrate.blocks.block_feed`: a layer
    deep in a ResNet-56 is reached through its block, not the 40 layers before it)."""

    teacher: Callable[[int], object]
    student: Callable[[int], object]
    batches: int


def image_feed(teacher: nn.Module, student: nn.Module, batches: list[torch.Tensor], device, dtype) -> Feed:
    """Both networks run from the calibration images."""
    def on_images(model: nn.Module) -> Callable[[int], object]:
        return lambda b: model(batches[b].to(device=device, dtype=dtype))

    return Feed(on_images(teacher), on_images(student), len(batches))


class Stop(Exception):
    """Raised by a hook once a forward pass has given what it was run for."""


def capture(run: Callable[[], object], module: nn.Module, pre: bool, calls: int | None) -> list:
    """Call ``run`` (one forward pass) until ``module`` has run ``calls`` times (None: the
    whole pass); for each call, a copy of its (args, kwargs) (``pre``) or of its output."""
    seen: list = []

    def copy(value):
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    def keep(value):
        seen.append(value)
        if calls is not None and len(seen) >= calls:
            raise Stop

    if pre:
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: keep((tuple(copy(a) for a in args), dict(kwargs))), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, args, output: keep(copy(output)))
    try:
        run()
    except Stop:
        pass
    finally:
        handle.remove()
    return seen


def run_until(run: Callable[[], object], module: nn.Module, calls: int, pre: bool) -> list:
    """Call ``run`` until ``module`` has run ``calls`` times; its first inputs (``pre``)
    or outputs of those calls."""
    seen = capture(run, module, pre, calls)
    return [args[0] for args, _ in seen] if pre else seen


def patch_rows(x: torch.Tensor, conv: nn.Conv2d, positions: torch.Tensor) -> torch.Tensor:
    """(B*k, M*kh*kw) patches of ``x`` under ``conv``'s geometry at output
    positions ``positions`` (B, k), ordered like ``conv.weight.view(N, -1)``."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_w = (padded.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    rows = (positions // out_w) * sh  # (B, k)
    cols = (positions % out_w) * sw
    taps_h = torch.arange(kh, device=x.device).repeat_interleave(kw) * dh  # (T,)
    taps_w = torch.arange(kw, device=x.device).repeat(kh) * dw
    r = rows[..., None] + taps_h  # (B, k, T)
    c = cols[..., None] + taps_w
    b = torch.arange(x.shape[0], device=x.device)[:, None, None].expand_as(r)
    patches = padded.permute(0, 2, 3, 1)[b, r, c]  # (B, k, T, M)
    return patches.permute(0, 1, 3, 2).reshape(-1, x.shape[1] * kh * kw)


def features_of(patches: torch.Tensor) -> torch.Tensor:
    """(S, D+1) float64: the patches and the constant feature of the bias."""
    return torch.cat([patches, patches.new_ones(len(patches), 1)], 1).double()


@dataclass
class Moments:
    """Moments of (patch, target) pairs; feature index D is the constant 1."""

    gram: torch.Tensor  # (D+1, D+1)
    cross: torch.Tensor  # (D+1, N)
    target_sum: torch.Tensor  # (N,)
    target_square: torch.Tensor  # (N,)
    count: int = 0

    @classmethod
    def empty(cls, features: int, outputs: int) -> "Moments":
        f64 = torch.float64
        return cls(torch.zeros(features + 1, features + 1, dtype=f64), torch.zeros(features + 1, outputs, dtype=f64),
                   torch.zeros(outputs, dtype=f64), torch.zeros(outputs, dtype=f64))

    def add(self, patches: torch.Tensor, targets: torch.Tensor) -> None:
        # float64 products: the errors are differences of these sums (a float32
        # Gram matrix leaves relative errors below ~1e-3 unmeasurable)
        features = features_of(patches)
        targets = targets.double()
        self.gram += (features.mT @ features).cpu()
        self.cross += (features.mT @ targets).cpu()
        self.target_sum += targets.sum(0).cpu()
        self.target_square += targets.square().sum(0).cpu()
        self.count += len(patches)

    def squared_error(self, weight: torch.Tensor) -> torch.Tensor:
        """Per output: sum over samples of (weight @ [u; 1] - y)^2 for weight (N, D+1)."""
        return ((weight @ self.gram) * weight).sum(1) - 2 * (weight * self.cross.mT).sum(1) + self.target_square

    def relative_error(self, weight: torch.Tensor) -> float:
        total = self.target_square.sum().item()
        return math.sqrt(max(self.squared_error(weight).sum().item(), 0.0) / total) if total > 0 else 0.0


def samples(feed: Feed, teacher_conv, new_layer, calls, settings, layer_index):
    """Yield (patches (S, M*kh*kw), targets (S, N)) per batch and call: the
    student's input patches and the teacher's outputs at the sampled pixels.
    The same pixels on every pass (seeded by layer, batch and call)."""
    conv = teacher_conv
    device = conv.weight.device
    for batch_index in range(feed.batches):
        targets = run_until(lambda: feed.teacher(batch_index), conv, calls, pre=False)
        inputs = run_until(lambda: feed.student(batch_index), new_layer, calls, pre=True)
        for call, (x, y) in enumerate(zip(inputs, targets)):
            if x.dim() == 3:  # unbatched call
                x, y = x[None], y[None]
            positions_total = y.shape[-2] * y.shape[-1]
            k = min(positions_total, settings.pixels_per_image)
            generator = torch.Generator().manual_seed(settings.seed + 7919 * layer_index + 104729 * batch_index + call)
            positions = torch.stack([torch.randperm(positions_total, generator=generator)[:k]
                                     for _ in range(len(x))]).to(device)
            picked = y.flatten(2).gather(2, positions[:, None, :].expand(-1, y.shape[1], -1))  # (B, N, k)
            yield patch_rows(x, conv, positions), picked.permute(0, 2, 1).reshape(-1, y.shape[1])


def collect(feed: Feed, teacher_conv, new_layer, calls, settings, layer_index) -> Moments | None:
    conv = teacher_conv
    moments = Moments.empty(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1], conv.out_channels)
    for patches, targets in samples(feed, conv, new_layer, calls, settings, layer_index):
        moments.add(patches, targets)
    return moments if moments.count else None
