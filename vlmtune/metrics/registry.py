"""Metric name -> Metric, and the default metrics for each data format (`--metric auto`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import VlmtuneError
from .anls import ANLS
from .base import Metric, Sample, Scores
from .captions import BLEU4, CIDER, ROUGE_L
from .choice import MC_ACCURACY
from .pope import POPE
from .relaxed import RELAXED_ACCURACY
from .text import EXACT_MATCH, TOKEN_F1
from .vqa import VQA_ACCURACY

METRICS: dict[str, Metric] = {m.name: m for m in (
    EXACT_MATCH, VQA_ACCURACY, ANLS, RELAXED_ACCURACY, MC_ACCURACY, TOKEN_F1, POPE, BLEU4, ROUGE_L, CIDER)}

_CHAT = ("exact_match", "token_f1")  # formats whose answer is a free assistant turn
AUTO = {"vqa": ("vqa_accuracy", "exact_match"), "caption": ("cider", "bleu4"), "messages": _CHAT, "llava": _CHAT,
        "sharegpt": _CHAT, "prompt_completion": _CHAT, "alpaca": _CHAT}


class UnknownMetricError(VlmtuneError, ValueError):
    pass


def known_metrics() -> tuple[str, ...]:
    return tuple(METRICS)


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise UnknownMetricError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}") from None


def resolve_metrics(names: Iterable[str], data_format: str | None = None) -> list[Metric]:
    """The metrics named (each once, in order), with `auto` expanded for the data format; every unknown
    name in one error."""
    names = list(names)
    unknown = [n for n in names if n != "auto" and n not in METRICS]
    if unknown:
        raise UnknownMetricError(f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                 f"known metrics: auto, {', '.join(METRICS)}")
    out: dict[str, Metric] = {}
    for name in names:
        for n in (auto_metrics(data_format) if name == "auto" else (name,)):
            out.setdefault(n, METRICS[n])
    return list(out.values())


def auto_metrics(data_format: str | None) -> tuple[str, ...]:
    """vqa -> VQA accuracy + exact match, caption -> CIDEr + BLEU-4, conversation formats -> EM + token F1."""
    if data_format not in AUTO:
        raise UnknownMetricError(f"metric auto: no default metrics for data format {data_format!r} (formats: "
                                 f"{', '.join(AUTO)}); name the metrics instead: {', '.join(METRICS)}")
    return AUTO[data_format]


def reference_problems(metric: Metric, references: Sequence[Sequence[str]]) -> list[str]:
    """Each row whose references the metric cannot score ('row N: ...', 1-based), to report before generating.
    Rows without any reference are the caller's to count and skip."""
    problems = []
    for i, refs in enumerate(references, 1):
        for ref in refs:
            if problem := metric.check_reference(ref):
                problems.append(f"row {i}: {problem}")
                break
    return problems


def score(name: str, samples: Sequence[Sample]) -> Scores:
    return get_metric(name).score(samples)
