"""The BatchNorm after a replaced layer: keep the teacher's statistics or re-estimate
them, whichever gives the lower error of its output, computed from the moments alone."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...layers.protocol import batchnorm_affine
from .moments import Feed, Moments, run_until

__all__ = ["bn_decision", "reestimate_bn"]

def _affine_cpu(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 on the CPU with statistics (mean, var)."""
    scale, shift = batchnorm_affine(bn, mean, var)
    return scale.cpu(), shift.cpu()


def bn_decision(bn: nn.BatchNorm2d, weight: torch.Tensor, moments: Moments, policy: str,
                 shift: torch.Tensor | None = None) -> tuple:
    """Errors of the BatchNorm's output against the teacher's with kept and with
    re-estimated statistics; re-estimates (in place) when that is lower
    (``policy="auto"``) or ``policy="always"``. ``weight`` (N, D+1) includes
    ``shift``, a fitted bias the layer itself lacks: kept statistics take it
    in their mean (running_mean - shift); re-estimated ones see the layer's
    real output (without it)."""
    n = moments.count
    mean_t = bn.running_mean.double().cpu()
    a_t, c_t = _affine_cpu(bn, mean_t, bn.running_var.double().cpu())
    s_hat = weight @ moments.gram[:, -1]  # sum y_hat (the last gram column is sum [u; 1])
    s_hat2 = ((weight @ moments.gram) * weight).sum(1)
    s_hat_y = (weight * moments.cross.mT).sum(1)
    s_y, s_y2 = moments.target_sum, moments.target_square
    s_z = a_t * s_y + n * c_t
    s_z2 = a_t.square() * s_y2 + 2 * a_t * c_t * s_y + n * c_t.square()
    s_hat_z = a_t * s_hat_y + c_t * s_hat

    def error(a, c) -> float:
        squared = a.square() * s_hat2 + 2 * a * c * s_hat + n * c.square() - 2 * a * s_hat_z - 2 * c * s_z + s_z2
        total = s_z2.sum().item()
        return math.sqrt(max(squared.sum().item(), 0.0) / total) if total > 0 else 0.0

    mean = s_hat / n
    var = (s_hat2 / n - mean.square()).clamp(min=0)
    kept, reestimated = error(a_t, c_t), error(*_affine_cpu(bn, mean, var))
    chosen = policy == "always" or (policy == "auto" and reestimated < kept)
    shift = torch.zeros_like(mean) if shift is None else shift.double().cpu()
    if chosen:
        bn.running_mean.copy_((mean - shift).to(bn.running_mean))
        bn.running_var.copy_((var * n / max(n - 1, 1)).to(bn.running_var))
    else:
        bn.running_mean.copy_((mean_t - shift).to(bn.running_mean))
    return kept, reestimated, chosen


def reestimate_bn(feed: Feed, bn: nn.BatchNorm2d) -> None:
    """Set ``bn``'s running statistics to its inputs' mean and (unbiased)
    variance over every pixel of the calibration images (the student's passes of ``feed``)."""
    total = torch.zeros(bn.num_features, dtype=torch.float64)
    square = torch.zeros(bn.num_features, dtype=torch.float64)
    count = 0
    for batch in range(feed.batches):
        for x in run_until(lambda: feed.student(batch), bn, 1, pre=True):
            x = x.double().transpose(0, 1).reshape(bn.num_features, -1).cpu()
            total += x.sum(1)
            square += x.square().sum(1)
            count += x.shape[1]
    if count > 1:
        mean = total / count
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_(((square - count * mean.square()) / (count - 1)).clamp(min=0).to(bn.running_var))
