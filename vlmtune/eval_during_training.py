"""Task metrics during training: at each evaluation the first `train.eval_generate_samples` eval rows get a greedy
reply from the model being trained, scored by `vlmtune eval`'s metrics, and logged as eval_<key> beside eval_loss
(so `train.best_metric` can name them).

The rows, prompts and scores are `vlmtune eval`'s own (evaluation/rows.py, inference/generation.py,
evaluation/report.py): a score during training is the score `vlmtune eval` gives that checkpoint on those rows.
Generation runs in eval mode without gradients and leaves the random state as it found it, so a run with these
metrics trains exactly as one without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.formatting import Formatter
from .errors import VlmtuneError
from .evaluation.report import score_one
from .evaluation.rows import EvalRow, read_eval_rows
from .evaluation.run import check_references
from .evaluation.systems import replies
from .inference.load import Loaded
from .metrics import Metric, resolve_metrics


@dataclass
class GenerationEval:
    rows: list[EvalRow]
    metrics: list[Metric]
    family: object
    processor: object
    formatter: Formatter
    batch_size: int
    max_new_tokens: int


def setup(plan) -> GenerationEval | None:
    """The rows and metrics of a plan's generation eval (None: train.eval_metrics is empty); VlmtuneError naming
    the eval file when its rows have no reference answer or references a metric cannot score."""
    t, d = plan.recipe.train, plan.recipe.data
    if not t.eval_metrics:
        return None
    metrics = resolve_metrics(t.eval_metrics, d.format)
    options = {"columns": dict(d.columns or {}), "caption_prompt": d.caption_prompt}
    try:
        rows = read_eval_rows(d.eval, d.format, options, d.image_root).rows[:t.eval_generate_samples]
        check_references(metrics, rows)
    except VlmtuneError as e:
        raise VlmtuneError(f"train.eval_metrics: {str(e).replace('with --metric', 'in train.eval_metrics')}") from None
    return GenerationEval(rows, metrics, plan.family, plan.processor, plan.formatter,
                          max(t.per_device_eval_batch_size, 1), t.eval_max_new_tokens)


def generation_scores(g: GenerationEval, model) -> dict[str, float]:
    """{summary key: value} of every metric on the model's replies to the rows (eval mode, no grad, RNG kept)."""
    loaded = Loaded(model, g.processor, g.family, g.formatter, "adapter")
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            predictions = replies(loaded, g.rows, batch_size=g.batch_size, max_new_tokens=g.max_new_tokens,
                                  seed=0, desc="generate", progress=False)
    finally:
        model.train(was_training)
    summary, _ = score_one(g.metrics, g.rows, predictions)
    return {key: value for keys in summary.values() for key, value in keys.items()}


class GenerationMetrics:
    """Trainer mixin: each evaluation's metrics also hold eval_<key> for the generation eval's metrics."""

    def __init__(self, *args, generation_eval: GenerationEval | None = None, **kwargs):
        self._generation_eval = generation_eval
        super().__init__(*args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self._generation_eval is not None:
            for key, value in generation_scores(self._generation_eval, self.model).items():
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output
