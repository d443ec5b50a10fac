"""Uncertainty of the report's numbers, in numpy.

- `paired_bootstrap(a, b)`: a and b are two models' values on the same questions (in the same
  order). Each resample draws n questions with replacement and takes the mean of a - b over them;
  the 95% interval is the 2.5th and 97.5th percentile of those means (the percentile bootstrap), so
  question-to-question difficulty cancels in every pair. The draws come from numpy's PCG64 seeded by
  `seed`, so a report is reproducible.
- `across_seeds(values)`: one value per seed (a score, or a paired difference). Mean, sample
  standard deviation and the 95% Student-t interval of the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
# rows of resampled question indices drawn at once: bounds the memory to ~8 MB per 1k questions
_BLOCK_ROWS = 1000
# two-sided 95% critical values of Student's t for 1..30 degrees of freedom; beyond, the normal 1.96
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float | None    # None: no interval (too few values, or no resamples asked)
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "excludes_zero": self.excludes_zero}


def resampled_means(values: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    """The mean of `values` over `iterations` resamples of its indices with replacement."""
    rng = np.random.default_rng(seed)
    count = len(values)
    means = np.empty(iterations)
    for start in range(0, iterations, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, iterations - start)
        indices = rng.integers(0, count, size=(rows, count))  # (rows, questions)
        means[start:start + rows] = values[indices].mean(axis=1)
    return means


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iterations: int, seed: int) -> Interval:
    """The mean of a - b with its 95% paired percentile-bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired values must be two equally long non-empty lists, got {a.shape} and {b.shape}")
    differences = a - b
    estimate = float(differences.mean())
    if iterations < 1 or len(differences) < 2:
        return Interval(estimate, None, None)
    means = resampled_means(differences, iterations, seed)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high))


def t_critical(degrees_of_freedom: int) -> float:
    return _T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T_975) else 1.96


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    std: float | None        # sample standard deviation (ddof 1); None for one seed
    interval: Interval       # 95% t interval of the mean
    values: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "values": list(self.values), **{
            key: value for key, value in self.interval.as_dict().items() if key != "estimate"}}


def across_seeds(values: Sequence[float]) -> SeedSummary:
    values = tuple(float(v) for v in values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return SeedSummary(mean, None, Interval(mean, None, None), values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t_critical(len(values) - 1) * std / math.sqrt(len(values))
    return SeedSummary(mean, std, Interval(mean, mean - half, mean + half), values)
