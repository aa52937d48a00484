"""ANLS, the DocVQA / ST-VQA metric (Biten et al. 2019), with rapidfuzz's Levenshtein distance.

Both strings are lowercased, stripped and whitespace-collapsed (as the DocVQA evaluation does).
NL = edit distance / length of the longer string; a row scores 1 - NL against a reference when NL < 0.5
and 0 when NL >= 0.5 (the paper's threshold: exactly 0.5 scores 0), the best over its references.
Two empty strings score 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

from .base import per_row

THRESHOLD = 0.5


def _clean(text: str) -> str:
    return " ".join(text.lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    longest = max(len(a), len(b))
    return Levenshtein.distance(a, b) / longest if longest else 0.0


def anls(prediction: str, references: Sequence[str], threshold: float = THRESHOLD) -> float:
    pred = _clean(prediction)
    best = 0.0
    for ref in references:
        nl = normalized_levenshtein(pred, _clean(ref))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


ANLS = per_row("anls", "DocVQA ANLS: 1 - normalised Levenshtein (rapidfuzz) when below 0.5, else 0; best reference",
               lambda s: anls(s.prediction, s.references))
