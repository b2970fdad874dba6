"""Interleaved timing: every candidate runs once per round, rounds repeat.

Running A, B, C, A, B, C, ... in one process spreads slow phases of the machine
(other processes, frequency changes) over all candidates alike, so the ratios
of their medians are far less biased than timing A to the end, then B.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

__all__ = ["Timing", "time_interleaved"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: median, fastest, slowest, quartiles."""

    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    repeats: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Timing":
        ordered = sorted(samples)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ordered))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = 5%)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time each zero-argument callable: ``warmup`` untimed calls each, then
    ``repeats`` rounds in which every candidate runs ``inner`` times in a row;
    a sample is the mean of those ``inner`` calls."""
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, inner >= 1, warmup >= 0; got {repeats}, {inner}, {warmup}")
    for run in candidates.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = clock()
            for _ in range(inner):
                run()
            samples[name].append((clock() - start) / inner)
    return {name: Timing.from_samples(values) for name, values in samples.items()}
