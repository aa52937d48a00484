"""train.best_metric: the Trainer's load_best_model_at_end, and what the run folder says about the checkpoint kept.

The Trainer compares every evaluation by the metric (loss: lower is better, the task metrics: higher), keeps the
best saved checkpoint from rotation and loads its weights at the end, so the adapter written to the run folder
is that checkpoint's; `best_checkpoint` in train_results.json and vlmtune.json names its step and score.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config.eval_fields import best_metric_key

_STEP = re.compile(r"checkpoint-(\d+)$")
KEY = "best_checkpoint"  # in train_results.json and vlmtune.json


def trainer_args(train) -> dict:
    """The TrainingArguments for a recipe's train section ({} without best_metric)."""
    if train.best_metric is None:
        return {}
    key = best_metric_key(train.best_metric)
    return {"load_best_model_at_end": True, "metric_for_best_model": key, "greater_is_better": key != "eval_loss"}


def published(state, run_dir: Path, final: Path) -> bool:
    """Point state.best_model_checkpoint at the best checkpoint's published folder (the Trainer, saving under
    checkpoints/.saving/, would record the staged path); True when it changed."""
    if not state.best_global_step:
        return False
    best = run_dir / f"checkpoint-{state.best_global_step}"
    if best != final and not best.is_dir():  # evaluated at a step that saved nothing: the earlier best stays
        return False
    changed = state.best_model_checkpoint != str(best)
    state.best_model_checkpoint = str(best)
    return changed


def record(trainer) -> dict | None:
    """{"step", "metric", "value", "checkpoint"} of the checkpoint whose weights the trainer loaded at the end."""
    args, state = trainer.args, trainer.state
    if not args.load_best_model_at_end or not state.best_model_checkpoint:
        return None
    step = int(_STEP.search(state.best_model_checkpoint).group(1))
    key = args.metric_for_best_model
    value = next((h[key] for h in state.log_history if h.get("step") == step and key in h), None)
    return {"step": step, "metric": key, "value": value, "checkpoint": f"checkpoints/checkpoint-{step}"}


def reported(trainer, log=print) -> dict:
    """{KEY: record} for train_results.json, logged in a line ({} without train.best_metric)."""
    best = record(trainer)
    if best is None:
        return {}
    value = f"{best['value']:.4g}" if isinstance(best["value"], (int, float)) else "?"
    log(f"best checkpoint: step {best['step']} ({best['metric']} {value}); the adapter written is that checkpoint's")
    return {KEY: best}


def entry(metrics: dict) -> dict:
    """The part of a run's metrics that vlmtune.json also holds."""
    return {KEY: metrics[KEY]} if KEY in metrics else {}
