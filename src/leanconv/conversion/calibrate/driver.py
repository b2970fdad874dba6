"""The calibration driver: each replaced layer, in network order, fitted by its own
:meth:`~leanconv.layers.LeanConvLayer.calibration_fit`, and each block that holds
replaced layers reconstructed after its layers' fits (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...graph import followers as find_followers
from ...layers import LeanConvLayer
from ...ops.least_squares import augment
from .batchnorm import bn_decision, reestimate_bn
from .blocks import block_error, block_feed, cache_block, find_blocks, reconstruct, split
from .moments import Feed, Moments, as_batches, collect, image_feed, samples as sampled_pairs
from .relu import refine_for_relu
from .settings import BlockFit, CalibrationSettings, LayerFit

__all__ = ["calibrate", "effective_weight", "fit_layer"]

def effective_weight(layer: nn.Module) -> torch.Tensor:
    """(N, D+1) float64: the layer's dense equivalent, flattened, with its bias."""
    return augment(*layer.dense_equivalent())


def fit_layer(layer: nn.Module, moments: Moments, settings: CalibrationSettings, free_bias: bool):
    """Fit ``layer`` in place (its :meth:`~leanconv.layers.LeanConvLayer.calibration_fit`).
    Returns (method, effective weight after the fit, the bias a layer without one was fitted
    with (``free_bias``: it goes into the following BatchNorm) or None)."""
    method, extra = layer.calibration_fit(moments, settings, free_bias)
    weight = effective_weight(layer)
    if extra is not None:
        weight[:, -1] += extra
    return method, weight, extra


def why_not_fitted(layer: nn.Module, features: int, settings: CalibrationSettings) -> str:
    if not settings.fit:
        return "not fitted: fit=False"
    if not isinstance(layer, LeanConvLayer):
        return f"no fit for {type(layer).__name__}"
    blocker = layer.calibration_blocker()
    if blocker:
        return blocker
    if features > settings.max_features:
        return f"not fitted: {features:,} patch entries > max_features={settings.max_features:,}"
    return ""


@torch.no_grad()
def calibrate(teacher: nn.Module, student: nn.Module, layers: list[tuple[nn.Conv2d, nn.Module, int]],
              calibration, settings: CalibrationSettings | None = None) -> tuple[list[LayerFit], list[BlockFit]]:
    """Fit ``layers`` ((teacher's dense conv, student's replacement, calls per
    forward pass), in execution order) to the teacher on ``calibration`` images,
    then reconstruct each block that holds them (``settings.block_steps``; the
    block's layers are fitted just before it, on the inputs the student gives
    them). Returns one :class:`LayerFit` per layer and one :class:`BlockFit` per
    block. Both models run in eval mode; their train/eval flags are restored."""
    settings = settings or CalibrationSettings()
    batches = as_batches(calibration, settings.batch_size)
    flags = {m: m.training for m in (*teacher.modules(), *student.modules())}
    teacher.eval()
    student.eval()
    try:
        device = next((p.device for p in student.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), torch.float32)
        pairs, _ = find_followers(student, layers=[new for _, new, _ in layers],
                                  example=batches[0].to(device=device, dtype=dtype))
        followers = {id(student.get_submodule(p.layer)): (p.follower, student.get_submodule(p.follower), p.relu_only)
                     for p in pairs}
        images = image_feed(teacher, student, batches, device, dtype)
        bns = [follower for _, follower, _ in followers.values()]
        followers_calls = _calls(lambda: images.student(0), bns)  # per whole forward pass
        fitter = _LayerFitter(settings, followers)
        blocks = []
        if settings.fit and settings.block_steps:
            blocks = find_blocks(student, [new for _, new, _ in layers], settings.block_layers)
        block_of = {index: block for block in blocks for index in block.layers}
        names = {id(module): name for name, module in student.named_modules()}
        fits: list[LayerFit | None] = [None] * len(layers)
        block_fits = []
        for index in range(len(layers)):
            if fits[index] is not None:
                continue
            block = block_of.get(index)
            if block is None:
                fits[index] = fitter.fit(index, *layers[index], images)
                continue
            record = BlockFit(block.name, [names.get(id(layers[i][1]), "") for i in block.layers])
            cache = cache_block(teacher, student, block, batches, device, dtype, settings)
            if cache.reason:
                record.method = cache.reason
            else:
                seed = settings.seed + 7919 * len(block_fits)
                fitting, held_out = split(cache, seed)
                record.images, record.held_out = cache.images, len(held_out)
                record.error_transfer = block_error(student, block, cache, held_out, settings)
            cached = block_feed(teacher, student, block, cache, len(batches))
            for i in block.layers:
                old, new, calls = layers[i]
                follower = followers.get(id(new), (None, None))[1]
                serves = cached is not None and _reaches(cached, old, new, calls, follower, followers_calls)
                fits[i] = fitter.fit(i, old, new, calls, cached if serves else images)
            if not cache.reason:
                record.error_layers = block_error(student, block, cache, held_out, settings)
                reconstruct(student, block, cache, record, fitting, held_out, settings, seed)
            del cache
            block_fits.append(record)
        return fits, block_fits
    finally:
        for module, training in flags.items():
            module.training = training


def _reaches(cached: Feed, old: nn.Conv2d, new: nn.Module, calls: int, follower: nn.Module | None,
             followers_calls: dict[int, int]) -> bool:
    """Whether a block's cached passes run the layer, its teacher convolution and the BatchNorm
    after it as often as a whole forward pass does (a module also called outside the block, or
    a BatchNorm after the block, needs the images)."""
    if not calls:
        return False
    wanted = [(cached.teacher, old, calls), (cached.student, new, calls)]
    if follower is not None:
        wanted.append((cached.student, follower, followers_calls[id(follower)]))
    return all(_calls(lambda: run(0), [module])[id(module)] == count for run, module, count in wanted)


def _calls(run, modules: list[nn.Module]) -> dict[int, int]:
    """How many times each of ``modules`` runs in one call of ``run`` (by id)."""
    counts = {id(module): 0 for module in modules}

    def count(module, args, output):
        counts[id(module)] += 1

    handles = [module.register_forward_hook(count) for module in modules]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return counts


class _LayerFitter:
    """The per-layer steps (fit, ReLU-aware refinement, BatchNorm) of one replaced layer."""

    def __init__(self, settings, followers) -> None:
        self.settings, self.followers = settings, followers

    def fit(self, index: int, old: nn.Conv2d, new: nn.Module, calls: int, feed: Feed) -> LayerFit:
        """Fit ``new`` on the passes of ``feed`` (the images, or its block's cache)."""
        settings = self.settings
        kh, kw = old.kernel_size
        m, taps = old.in_channels, kh * kw
        follower = self.followers.get(id(new))
        reason = why_not_fitted(new, m * taps, settings) or (
            "" if calls else "not fitted: did not run on the calibration images")
        moments = None if reason else collect(feed, old, new, calls, settings, index)
        if moments is None:
            fit = LayerFit(reason or "not fitted: did not run on the calibration images")
            if follower is not None and calls:
                fit.batchnorm, fit.bn_reestimated = follower[0], True
                reestimate_bn(feed, follower[1])
            return fit
        before = effective_weight(new)
        fit = LayerFit("", error_transfer=moments.relative_error(before), samples=moments.count)
        saved = {k: v.clone() for k, v in new.state_dict().items()}
        # A layer without a bias before a BatchNorm is fitted with one, folded into the BatchNorm's mean.
        free_bias = follower is not None
        fit.method, weight, extra = fit_layer(new, moments, settings, free_bias)
        fit.error_fit = moments.relative_error(weight)
        if fit.error_fit >= fit.error_transfer:  # ridge or a poor sample: keep the transfer
            new.load_state_dict(saved)
            fit.method += " (not kept: no lower error than the transfer)"
            fit.error_fit, weight, extra = None, before, None
        refined = follower is not None and follower[2] and fit.error_fit is not None and settings.relu_iterations
        if refined:
            def new_pass():
                return sampled_pairs(feed, old, new, calls, settings, index)

            weight, extra, fit.relu_error_linear, fit.relu_error_refined = refine_for_relu(
                new_pass, new, follower[1], moments, weight, extra, settings, free_bias, fit_layer)
            fit.error_fit = moments.relative_error(weight)
            fit.method += f", ReLU-aware refinement ({settings.relu_iterations} passes)"
        if extra is not None:
            fit.method += " (with a bias, folded into the following BatchNorm)"
        if follower is not None:
            fit.batchnorm = follower[0]
            # the refinement fitted activations under the teacher's statistics: they stay
            policy = "always" if fit.error_fit is None else "never" if refined else settings.batchnorm
            fit.bn_error_kept, fit.bn_error_reestimated, fit.bn_reestimated = bn_decision(
                follower[1], weight, moments, policy, extra)
        return fit
