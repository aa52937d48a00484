"""Paired bootstrap of a metric's difference between two systems on the same rows, and the rows that moved.

Rows are resampled with replacement (numpy Generator seeded by `seed`, so a seed gives the same interval);
each resample recomputes both systems' aggregate on the same rows -- the full corpus-level formula for
POPE, BLEU-4 and CIDEr -- and the interval is the percentile one over the resampled differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Metric, Sample


@dataclass(frozen=True)
class Difference:
    key: str
    a: float  # the first system (the base), on all rows
    b: float  # the second (the adapter)
    low: float  # the confidence interval of b - a
    high: float

    @property
    def delta(self) -> float:
        return self.b - self.a


@dataclass(frozen=True)
class Mover:
    row: int  # 0-based index into the samples
    a: float
    b: float

    @property
    def delta(self) -> float:
        return self.b - self.a


def _check_paired(samples_a: Sequence[Sample], samples_b: Sequence[Sample]) -> None:
    if len(samples_a) != len(samples_b):
        raise ValueError(f"a paired comparison needs the same rows: {len(samples_a)} rows against {len(samples_b)}")
    for i, (x, y) in enumerate(zip(samples_a, samples_b, strict=True)):
        if x.references != y.references:
            raise ValueError(f"row {i + 1}: the two systems were scored against different references")


def paired_bootstrap(metric: Metric, samples_a: Sequence[Sample], samples_b: Sequence[Sample], *,
                     resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> list[Difference]:
    """For each of the metric's summary numbers: a on all rows, b on all rows, and the CI of b - a."""
    _check_paired(samples_a, samples_b)
    n = len(samples_a)
    if n == 0:
        raise ValueError("a bootstrap needs at least one row")
    prep_a, prep_b = metric.prepare(samples_a), metric.prepare(samples_b)
    everything = np.arange(n)
    full_a, full_b = metric.aggregate(prep_a, everything), metric.aggregate(prep_b, everything)
    rng = np.random.default_rng(seed)
    deltas = {key: np.empty(resamples) for key in full_a}
    for r in range(resamples):
        idx = rng.integers(0, n, size=n)
        got_a, got_b = metric.aggregate(prep_a, idx), metric.aggregate(prep_b, idx)
        for key, values in deltas.items():
            values[r] = got_b[key] - got_a[key]
    tail = (1 - confidence) / 2 * 100
    out = []
    for key, values in deltas.items():
        low, high = np.percentile(values, [tail, 100 - tail])
        out.append(Difference(key, full_a[key], full_b[key], float(low), float(high)))
    return out


def movers(metric: Metric, samples_a: Sequence[Sample], samples_b: Sequence[Sample],
           k: int = 3) -> tuple[list[Mover], list[Mover]]:
    """The k rows whose score rose most from a to b, and the k that fell most (ties: the earlier row first)."""
    _check_paired(samples_a, samples_b)
    rows_a, rows_b = metric.prepare(samples_a).rows, metric.prepare(samples_b).rows
    delta = rows_b - rows_a
    order = np.argsort(-delta, kind="stable")
    better = [Mover(int(i), float(rows_a[i]), float(rows_b[i])) for i in order[:k] if delta[i] > 0]
    order = np.argsort(delta, kind="stable")
    worse = [Mover(int(i), float(rows_a[i]), float(rows_b[i])) for i in order[:k] if delta[i] < 0]
    return better, worse
