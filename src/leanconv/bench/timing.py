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

__all__ = ["Timing", "calls_lasting", "time_interleaved", "per_round_ratio"]


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        return q1, median, q3
    return ordered[0], ordered[0], ordered[0]


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: median, fastest, slowest, quartiles, and
    every round's sample in round order (``rounds``)."""

    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    repeats: int
    rounds: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Timing":
        q1, median, q3 = _quartiles(samples)
        return cls(median, min(samples), max(samples), q1, q3, len(samples), tuple(samples))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = 5%)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def per_round_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median and quartiles over rounds of numerator / denominator, both timed in the
    same rounds of one :func:`time_interleaved` call: a load that drifts between rounds
    scales both sides of a round alike, so these ratios scatter less than the times."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need samples of the same rounds; got {len(numerator)} and {len(denominator)}")
    median_q = _quartiles([a / b for a, b in zip(numerator, denominator)])
    return median_q[1], median_q[0], median_q[2]


def calls_lasting(run: Callable[[], object], seconds: float, clock: Callable[[], float] = time.perf_counter) -> int:
    """How many consecutive calls of ``run`` last about ``seconds`` (from one timed call; at
    least 1): a candidate's ``inner`` for :func:`time_interleaved`."""
    start = clock()
    run()
    return max(1, round(seconds / max(clock() - start, 1e-6)))


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    inner: int | Mapping[str, int] = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time each zero-argument callable: ``warmup`` untimed calls each, then
    ``repeats`` rounds in which every candidate runs ``inner`` times in a row (one
    count for all, or one per candidate's name); a sample is the mean of those calls."""
    counts = {name: inner[name] if isinstance(inner, Mapping) else inner for name in candidates}
    if repeats < 1 or warmup < 0 or any(count < 1 for count in counts.values()):
        raise ValueError(f"need repeats >= 1, inner >= 1, warmup >= 0; got {repeats}, {inner}, {warmup}")
    for run in candidates.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            count = counts[name]
            start = clock()
            for _ in range(count):
                run()
            samples[name].append((clock() - start) / count)
    return {name: Timing.from_samples(values) for name, values in samples.items()}
