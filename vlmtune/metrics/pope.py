"""POPE yes/no object-hallucination scores (Li et al. 2023): accuracy, precision, recall, F1, yes-ratio.

"yes" is the positive class. An answer is read as the POPE evaluation script reads it: only the text before
its first period counts, commas are dropped, and the answer is "no" when one of its words is "no", "No" or
"not", else "yes" -- so an answer that is neither ("a cat", "") counts as "yes", and so does "Not ..." (the
script matches those three spellings only). One change: words are split on any whitespace, not only spaces,
so "No\\nThere is..." reads as "no". The reference must be yes or no (any case, surrounding punctuation
ignored). The scores are corpus-level, from the confusion counts; a ratio with nothing to divide is 0. The
row score is 1 when the read answer equals the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Metric, Prepared, Sample

KEYS = ("pope_f1", "pope_accuracy", "pope_precision", "pope_recall", "pope_yes_ratio")


def read_yes_no(answer: str) -> str:
    first = answer.split(".")[0].replace(",", "")
    return "no" if {"no", "No", "not"} & set(first.split()) else "yes"


def _reference(ref: str) -> str | None:
    word = ref.strip().strip(".!,;:").strip().lower()
    return word if word in ("yes", "no") else None


def check_reference(ref: str) -> str | None:
    return None if _reference(ref) else f"POPE needs a yes/no reference, got {ref!r}"


def _prepare(samples: Sequence[Sample]) -> Prepared:
    stats = np.zeros((len(samples), 4))  # tp, fp, tn, fn
    for i, s in enumerate(samples):
        truth = _reference(s.references[0]) if s.references else None
        if truth is None:
            raise ValueError(f"row {i + 1}: {check_reference(s.references[0] if s.references else '')}")
        said = read_yes_no(s.prediction) == "yes"
        stats[i, (0 if truth == "yes" else 1) if said else (3 if truth == "yes" else 2)] = 1
    return Prepared(rows=stats[:, 0] + stats[:, 2], data=stats)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _aggregate(prepared: Prepared, idx: np.ndarray) -> dict[str, float]:
    tp, fp, tn, fn = (float(x) for x in prepared.data[idx].sum(axis=0))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"pope_f1": _ratio(2 * precision * recall, precision + recall),
            "pope_accuracy": _ratio(tp + tn, len(idx)), "pope_precision": precision, "pope_recall": recall,
            "pope_yes_ratio": _ratio(tp + fp, len(idx))}


POPE = Metric("pope", "POPE yes/no scores from the confusion counts; non-yes/no answers read as POPE's script does",
              _prepare, _aggregate, keys=KEYS, corpus=True, check_reference=check_reference)
