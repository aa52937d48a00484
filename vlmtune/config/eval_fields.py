"""train.eval_metrics, eval_generate_samples and best_metric: the metrics exist, the eval data is there, and the
best checkpoint is one that was evaluated (the Trainer keeps the best only among saved, evaluated steps)."""

from __future__ import annotations

from ..errors import FieldError
from .schema import Recipe

NOT_A_SCORE = {"pope_yes_ratio"}  # best near 0.5, neither higher nor lower: no checkpoint can be picked by it


def best_metric_key(name: str) -> str:
    """The logged name a train.best_metric value means: eval_loss, eval_<key> ("loss", "token_f1" as well)."""
    return name if name.startswith("eval_") else f"eval_{name}"


def logged_eval_keys(eval_metrics: list[str], data_format: str) -> list[str]:
    """eval_loss and eval_<key> of every summary key of the metrics (auto expanded for the data format)."""
    from ..metrics import resolve_metrics

    return ["eval_loss", *(f"eval_{k}" for m in resolve_metrics(eval_metrics, data_format) for k in m.summary_keys)]


def _method_eval_keys(recipe: Recipe) -> list[str] | None:
    """What the recipe's method logs at evaluation, where it says (methods.Method.eval_keys)."""
    from .. import methods

    return methods.get(recipe.method).eval_keys(recipe) if recipe.method in methods.names() else None


def eval_errors(recipe: Recipe) -> list[FieldError]:
    from ..metrics import UnknownMetricError, resolve_metrics

    t, d = recipe.train, recipe.data
    errs = []
    metrics_ok = True
    if t.eval_metrics:
        try:
            resolve_metrics(t.eval_metrics, d.format)
        except UnknownMetricError as e:
            errs.append(FieldError("train.eval_metrics", str(e)))
            metrics_ok = False
        if not d.eval:
            errs.append(FieldError("train.eval_metrics", "needs data.eval (the rows the replies are scored on)"))
    if t.best_metric is None:
        return errs
    if not d.eval:
        errs.append(FieldError("train.best_metric", "needs data.eval (the checkpoints are compared on it)"))
    key = best_metric_key(t.best_metric)
    own = _method_eval_keys(recipe)
    if metrics_ok:
        known = own or (logged_eval_keys(t.eval_metrics, d.format) if t.eval_metrics else ["eval_loss"])
        if key in {f"eval_{k}" for k in NOT_A_SCORE}:
            errs.append(FieldError("train.best_metric", f"{t.best_metric} is not better when higher or lower; "
                                   f"choose one of {', '.join(k for k in known if k[5:] not in NOT_A_SCORE)}"))
        elif key not in known:
            hint = "" if t.eval_metrics or own else " (add the metric to train.eval_metrics to log it)"
            errs.append(FieldError("train.best_metric", f"{t.best_metric!r} is not logged at evaluation; the logged "
                                   f"ones are {', '.join(known)}{hint}"))
    if t.eval_steps is None:
        errs.append(FieldError("train.best_metric", "needs train.eval_steps (the best checkpoint is chosen among "
                               f"the evaluated ones): set train.eval_steps, and train.save_steps ({t.save_steps}) "
                               "to a multiple of it"))
    elif t.eval_steps > 0 and t.save_steps % t.eval_steps:
        errs.append(FieldError("train.save_steps", f"must be a multiple of train.eval_steps with train.best_metric "
                               f"(only a checkpoint saved at an evaluated step can be the best), got save_steps "
                               f"{t.save_steps} and eval_steps {t.eval_steps}; e.g. save_steps: {t.eval_steps}"))
    return errs
