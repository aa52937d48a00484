"""Paired bootstrap of a metric's difference between two systems on the same rows, and the rows that moved.

Rows are resampled with replacement (numpy Generator seeded by `seed`, so a seed gives the same interval);
each resample recomputes both systems' aggregate on the same rows -- the full corpus-level formula for
POPE, BLEU-4 and CIDEr -- and the interval is the percentile one over the resampled differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Metric, Prepared, Sample


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


@dataclass(frozen=True)
class Comparison:
    metric: str
    differences: list[Difference]  # one per summary number, headline first
    better: list[Mover]  # the rows that rose most, most first
    worse: list[Mover]  # the rows that fell most, most first
    rows_a: list[float]
    rows_b: list[float]


def compare(metric: Metric, samples_a: Sequence[Sample], samples_b: Sequence[Sample], *, resamples: int = 1000,
            seed: int = 0, confidence: float = 0.95, k: int = 3) -> Comparison:
    """Both systems scored on the same rows (each prepared once): the bootstrap intervals and the movers."""
    _check_paired(samples_a, samples_b)
    if not samples_a:
        raise ValueError("a bootstrap needs at least one row")
    prep_a, prep_b = metric.prepare(samples_a), metric.prepare(samples_b)
    better, worse = _movers(prep_a.rows, prep_b.rows, k)
    return Comparison(metric.name, _intervals(metric, prep_a, prep_b, resamples, seed, confidence), better, worse,
                      [float(x) for x in prep_a.rows], [float(x) for x in prep_b.rows])


def paired_bootstrap(metric: Metric, samples_a: Sequence[Sample], samples_b: Sequence[Sample], *,
                     resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> list[Difference]:
    """For each of the metric's summary numbers: a on all rows, b on all rows, and the CI of b - a."""
    return compare(metric, samples_a, samples_b, resamples=resamples, seed=seed, confidence=confidence).differences


def movers(metric: Metric, samples_a: Sequence[Sample], samples_b: Sequence[Sample],
           k: int = 3) -> tuple[list[Mover], list[Mover]]:
    """The k rows whose score rose most from a to b, and the k that fell most (ties: the earlier row first)."""
    _check_paired(samples_a, samples_b)
    return _movers(metric.prepare(samples_a).rows, metric.prepare(samples_b).rows, k)


def _intervals(metric: Metric, prep_a: Prepared, prep_b: Prepared, resamples: int, seed: int,
               confidence: float) -> list[Difference]:
    n = len(prep_a.rows)
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


def _movers(rows_a: np.ndarray, rows_b: np.ndarray, k: int) -> tuple[list[Mover], list[Mover]]:
    delta = rows_b - rows_a
    better = [Mover(int(i), float(rows_a[i]), float(rows_b[i])) for i in np.argsort(-delta, kind="stable")[:k]
              if delta[i] > 0]
    worse = [Mover(int(i), float(rows_a[i]), float(rows_b[i])) for i in np.argsort(delta, kind="stable")[:k]
             if delta[i] < 0]
    return better, worse
