"""Exact match and token F1 as the SQuAD v2 evaluation script defines them (normalised text, best reference).

Normalisation: lowercase, drop punctuation (ASCII `string.punctuation` as SQuAD does, plus every Unicode
punctuation character, so curly quotes from a model count as punctuation too), drop the articles a/an/the,
collapse whitespace. Token F1 is the harmonic mean of token precision and recall over the bag of tokens;
when either side has no tokens it is 1 if both are empty, else 0 (SQuAD v2's rule).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

from .base import Sample, best_over_references, per_row

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


EXACT_MATCH = per_row(
    "exact_match", "SQuAD-normalised exact match (case, punctuation, articles, whitespace), best reference",
    lambda s: best_over_references(exact_match, s.prediction, s.references))
TOKEN_F1 = per_row(
    "token_f1", "SQuAD token F1 over normalised words, best reference",
    lambda s: best_over_references(token_f1, s.prediction, s.references))

__all__ = ["EXACT_MATCH", "TOKEN_F1", "Sample", "exact_match", "normalize_answer", "token_f1"]
