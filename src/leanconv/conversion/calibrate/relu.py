"""The ReLU-aware refinement of a fitted layer followed by BatchNorm and a ReLU (Zhang
et al., "Accelerating Very Deep Convolutional Networks for Classification and
Detection", TPAMI 2016, nonlinear response reconstruction)."""

from __future__ import annotations

import math

import torch

from ...layers.protocol import batchnorm_affine
from .moments import Moments, features_of

__all__ = ["activation_targets", "refine_for_relu"]

def activation_targets(samples, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gram: torch.Tensor):
    """One projection step of the ReLU-aware fit (Zhang et al., "Accelerating
    Very Deep Convolutional Networks for Classification and Detection", TPAMI
    2016, nonlinear response reconstruction). A BatchNorm ``a = scale * y +
    shift`` (the teacher's statistics) and a ReLU follow the layer. Where the
    teacher's activation is positive the target stays the teacher's output;
    where it is not, any output whose activation is not positive is as good,
    so the target becomes the layer's own prediction ``weight @ [u; 1]``
    projected onto that dead region. Returns the moments of (patch, new
    target) with ``gram`` reused, and the sum over samples of
    ``scale^2 * (target - prediction)^2``: the squared distance of the
    prediction's activations from the set of exact ones, an upper bound of
    the error after the ReLU (exact where the teacher's unit is off), and the
    sum of the teacher's squared activations after the ReLU."""
    moments = Moments(gram, torch.zeros_like(weight.mT), torch.zeros(len(weight), dtype=torch.float64),
                       torch.zeros(len(weight), dtype=torch.float64))
    distance = energy = 0.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    boundary = -shift / safe  # the output at which the activation crosses zero
    for patches, targets in samples:
        features = features_of(patches).cpu()
        targets = targets.double().cpu()
        predicted = features @ weight.mT
        active = scale * targets + shift > 0
        dead = scale * predicted + shift <= 0
        projected = torch.where(dead, predicted, boundary.expand_as(predicted))
        goal = torch.where(active, targets, projected)
        distance += (scale.square() * (goal - predicted).square()).sum().item()
        energy += (scale * targets + shift).clamp(min=0).square().sum().item()
        moments.cross += features.mT @ goal
        moments.target_sum += goal.sum(0)
        moments.target_square += goal.square().sum(0)
        moments.count += len(goal)
    return moments, distance, energy




def refine_for_relu(samples, layer, bn, moments: Moments, weight, extra, settings, free_bias, fit_layer):
    """The ReLU-aware refinement (:func:`_activation_targets`) of a fitted layer
    followed by ``bn`` (the teacher's statistics) and a ReLU: alternate the
    projection step and the layer's own least-squares fit, and keep the
    weights with the smallest activation distance. ``samples()`` starts a new
    pass over the same sampled pixels. Returns (weight, extra, relative
    activation error before, after)."""
    scale, shift = (t.cpu() for t in batchnorm_affine(bn))
    best = None
    for step in range(settings.relu_iterations + 1):
        targets, distance, energy = activation_targets(samples(), weight, scale, shift, moments.gram)
        if step == 0:
            first = distance
        if best is None or distance < best[0]:
            best = (distance, {k: v.clone() for k, v in layer.state_dict().items()}, weight, extra)
        if step == settings.relu_iterations:
            break
        _, weight, extra = fit_layer(layer, targets, settings, free_bias)
    distance, state, weight, extra = best
    layer.load_state_dict(state)
    relative = (lambda d: math.sqrt(d / energy) if energy > 0 else 0.0)
    return weight, extra, relative(first), relative(distance)
