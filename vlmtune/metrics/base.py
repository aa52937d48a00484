"""What every metric works on: a Sample per row, and a Metric that scores rows and aggregates them.

A metric is a pure function of (prediction, references[, question]): no model, no files. `prepare` does the
per-row work once (normalising, counting n-grams); `aggregate` turns the prepared rows, or a resample of them
given as row indices, into the summary numbers. Per-row metrics aggregate as the mean of the row scores;
corpus-level ones (POPE, BLEU-4, CIDEr) recompute from the rows' statistics, so a bootstrap resample gets
the same formula as the full set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sample:
    prediction: str
    references: tuple[str, ...]
    question: str = ""  # multiple choice reads the options from it

    def __post_init__(self):  # a lone string or a list of references is taken as the tuple it means
        refs = self.references
        object.__setattr__(self, "references", (refs,) if isinstance(refs, str) else tuple(refs))


@dataclass(frozen=True)
class Prepared:
    rows: np.ndarray  # one score per row, in [0, 1] (CIDEr: [0, 10]); what "better / worse rows" compares
    data: object = None  # what `aggregate` needs besides the row scores


@dataclass(frozen=True)
class Scores:
    rows: list[float]
    summary: dict[str, float]


@dataclass(frozen=True)
class Metric:
    name: str
    description: str  # one line: the definition followed and the library behind it
    prepare: Callable[[Sequence[Sample]], Prepared]
    aggregate: Callable[[Prepared, np.ndarray], dict[str, float]]  # (prepared, row indices) -> summary
    keys: tuple[str, ...] = ()  # the summary's names, headline first; () means just (name,)
    corpus: bool = False  # aggregate is not the mean of the row scores
    check_reference: Callable[[str], str | None] = field(default=lambda ref: None)  # a problem, or None

    @property
    def summary_keys(self) -> tuple[str, ...]:
        return self.keys or (self.name,)

    @property
    def headline(self) -> str:
        return self.summary_keys[0]

    def score(self, samples: Sequence[Sample]) -> Scores:
        prepared = self.prepare(samples)
        summary = self.aggregate(prepared, np.arange(len(samples)))
        return Scores(rows=[float(x) for x in prepared.rows], summary=summary)


def per_row(name: str, description: str, row_score: Callable[[Sample], float], **kwargs) -> Metric:
    """A metric whose summary is the mean of its row scores (0 for no rows)."""

    def prepare(samples: Sequence[Sample]) -> Prepared:
        return Prepared(np.array([row_score(s) for s in samples], dtype=float))

    def aggregate(prepared: Prepared, idx: np.ndarray) -> dict[str, float]:
        return {name: float(prepared.rows[idx].mean()) if len(idx) else 0.0}

    return Metric(name, description, prepare, aggregate, **kwargs)


def best_over_references(score: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    """The score against the closest reference (0 when there is none)."""
    return max((score(prediction, ref) for ref in references), default=0.0)
