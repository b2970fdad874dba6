"""Learning-rate schedules as a factor of the base rate per optimizer step.

* ``cosine``: 0.5 (1 + cos(pi t)) over the run after warm-up (Loshchilov &
  Hutter, SGDR, https://arxiv.org/abs/1608.03983).
* ``multistep``: times ``gamma`` at each milestone epoch (default: half and
  three quarters of the run).
* ``onecycle``: cosine rise from 1/25 to 1 over the first 30% of steps, cosine
  fall to 1/(25 * 1e4) (Smith & Topin, https://arxiv.org/abs/1708.07120; the
  defaults of ``torch.optim.lr_scheduler.OneCycleLR``).

A linear warm-up from 0 over ``warmup`` epochs comes first for cosine and
multistep. The schedule is a plain picklable object, so
``LambdaLR(optimizer, LRSchedule(...))`` checkpoints and resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LRSchedule"]


@dataclass
class LRSchedule:
    kind: str
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float = 0.0
    milestones: tuple = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        total = self.steps_per_epoch * self.epochs
        if self.kind == "onecycle":
            rise = max(1, int(0.3 * total))
            if step < rise:
                return _cosine_between(1 / 25, 1.0, step / rise)
            return _cosine_between(1.0, 1 / 25 / 1e4, (step - rise) / max(1, total - rise))
        warmup = int(round(self.warmup_epochs * self.steps_per_epoch))
        if step < warmup:
            return (step + 1) / warmup
        if self.kind == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if self.kind == "multistep":
            epoch = step / self.steps_per_epoch
            milestones = self.milestones or (self.epochs * 0.5, self.epochs * 0.75)
            return self.gamma ** sum(epoch >= m for m in milestones)
        raise ValueError(f"unknown schedule {self.kind!r}")


def _cosine_between(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
