"""`vlmtune eval`: generate for every row of a data file, score each reply against the row's references (metrics/),
and compare an adapter with its bare base (or another model) with paired bootstrap intervals."""

from .report import EvalResult
from .run import evaluate

__all__ = ["EvalResult", "evaluate"]
