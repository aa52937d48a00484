"""Relaxed accuracy, the ChartQA metric (Masry et al. 2022): a number within 5% of the reference, other
answers exactly (case-insensitive), the best over the references.

As in the reference implementation (pix2struct's `relaxed_correctness`): a trailing "%" divides by 100 on
either side (so "50%" equals "0.5"); the tolerance is relative to the reference, inclusive (|p - r| / |r| <=
0.05); a reference of 0 is compared as text. Two choices of ours: commas that group thousands ("1,234",
"12,345.6") are dropped before reading a number (the reference code reads "1,234" as text), and the numbers
are read as decimals, so 1.05 against 1 is exactly 5% and passes (binary floats make it 5.0000000000000044%).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from .base import per_row

TOLERANCE = Decimal("0.05")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")


def to_number(text: str) -> Decimal | None:
    """The number an answer states, or None when it is not one number."""
    text = text.strip()
    percent = text.endswith("%")
    if percent:
        text = text[:-1].rstrip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return value / 100 if percent else value


def relaxed_correct(prediction: str, reference: str, tolerance: Decimal = TOLERANCE) -> bool:
    pred, ref = to_number(prediction), to_number(reference)
    if pred is not None and ref is not None and ref != 0:
        return abs(pred - ref) / abs(ref) <= tolerance
    return prediction.strip().lower() == reference.strip().lower()


def relaxed_accuracy(prediction: str, references: Sequence[str]) -> float:
    return float(any(relaxed_correct(prediction, ref) for ref in references))


RELAXED_ACCURACY = per_row(
    "relaxed_accuracy", "ChartQA relaxed accuracy: numbers within 5% of the reference, text exactly",
    lambda s: relaxed_accuracy(s.prediction, s.references))
