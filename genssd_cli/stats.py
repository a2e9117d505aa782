"""Differences between two methods with a 95 % interval: a paired bootstrap over problems.

The units are one per problem both methods have a value for, in the order the caller gives
(`genssd report`: sorted by problem id). A difference's point estimate is the statistic on all
units; its interval comes from RESAMPLES resamples drawn from one `random.Random(SEED)`, made
afresh for each difference so that each is reproducible on its own. Resample b = 1 … RESAMPLES
takes n units with replacement, `rng.choices(units, k=n)`: unit floor(u · n) (0-based) for each
of n successive draws u = `rng.random()`. The interval is the percentile interval: the
(1 - LEVEL) / 2 and (1 + LEVEL) / 2 quantiles of the resampled statistics, each read from the
sorted values s_0 ≤ … ≤ s_{m-1} by linear interpolation at position q · (m - 1). Resamples on
which the statistic is undefined (a ratio over zero kept tokens) are left out and counted.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

SEED = 0
RESAMPLES = 2000
LEVEL = 0.95
MIN_PAIRS = 2  # fewer: no difference is given

Unit = TypeVar("Unit")


@dataclass(frozen=True)
class Difference:
    """A paired difference (other - reference): the point estimate and its interval; all None
    when fewer than MIN_PAIRS units or the statistic is undefined on them all."""

    delta: float | None
    low: float | None
    high: float | None
    pairs: int
    undefined: int = 0  # resamples left out: the statistic was undefined on them


def paired_bootstrap(units: Sequence[Unit], statistic: Callable[[Sequence[Unit]], float | None],
                     resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Difference:  # fmt: skip
    """The statistic on all units, and its percentile interval over resamples of the units."""
    n = len(units)
    delta = statistic(units) if n >= MIN_PAIRS else None
    if delta is None:
        return Difference(None, None, None, n)
    rng = random.Random(seed)
    values = [statistic(rng.choices(units, k=n)) for _ in range(resamples)]
    defined = sorted(v for v in values if v is not None)
    if not defined:
        return Difference(delta, None, None, n, resamples)
    low, high = quantile(defined, (1 - level) / 2), quantile(defined, (1 + level) / 2)
    return Difference(delta, low, high, n, resamples - len(defined))


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly at position q · (m - 1)."""
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def mean(differences: Sequence[float]) -> float:
    """Units are per-problem differences (other - reference): the mean difference."""
    return statistics.fmean(differences)


def ratio_difference(units: Sequence[tuple[float, float, float, float]]) -> float | None:
    """Units are per problem (reference numerator, reference denominator, other numerator, other
    denominator): Σ num / Σ den of the other minus that of the reference; None when a Σ den is 0."""
    ref_num, ref_den, other_num, other_den = (sum(column) for column in zip(*units, strict=True))
    if ref_den == 0 or other_den == 0:
        return None
    return other_num / other_den - ref_num / ref_den


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval (95 % by default) of a share p measured on n trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
