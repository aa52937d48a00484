"""Task metrics for `vlmtune eval`: pure functions of (prediction, references), a registry, a paired bootstrap.

Which library backs which metric: ANLS -> rapidfuzz (Levenshtein distance); BLEU-4, ROUGE-L, CIDEr ->
pycocoevalcap's scorers (the COCO caption evaluation; its Java PTB tokenizer is replaced by `captions.tokenize`);
bootstrap -> numpy. Exact match, token F1 (SQuAD), VQA accuracy (VQAv2), relaxed accuracy (ChartQA),
multiple choice and POPE are written here from their definitions (no maintained library computes them alone).
"""

from .base import Metric, Prepared, Sample, Scores
from .bootstrap import Comparison, Difference, Mover, compare, movers, paired_bootstrap
from .registry import (
    AUTO,
    METRICS,
    UnknownMetricError,
    auto_metrics,
    get_metric,
    known_metrics,
    reference_problems,
    resolve_metrics,
    score,
)

__all__ = ["AUTO", "METRICS", "Comparison", "Difference", "Metric", "Mover", "Prepared", "Sample", "Scores",
           "UnknownMetricError", "auto_metrics", "compare", "get_metric", "known_metrics", "movers",
           "paired_bootstrap", "reference_problems", "resolve_metrics", "score"]
