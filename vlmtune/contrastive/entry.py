"""The run-layer entry of `method: contrastive` (methods/contrastive.py names this module in `own_run`): what
`vlmtune train`, `vlmtune validate` and `vlmtune eval` call for a dual encoder. The method module stays at the
recipe layer (its section, checks and defaults); the run layer imports this one by that name."""

from __future__ import annotations


def run(recipe, log=print, overwrite: bool = False):
    """(output folder, metrics) of a whole contrastive run."""
    from .train import run_contrastive

    return run_contrastive(recipe, overwrite=overwrite, log=log)


def check(recipe, decode_images: bool = False):
    """`vlmtune validate`'s report of a contrastive recipe."""
    from .check import check_pairs

    return check_pairs(recipe, decode_images=decode_images)


def evaluate(model, data, *, batch_size, out=None, overwrite: bool = False, log=print, **options):
    """`vlmtune eval` of a dual encoder; `options`: the rest of evaluation.run.evaluate's arguments."""
    from .evaluate import evaluate_recall

    return evaluate_recall(model, data, batch_size=batch_size, out=out, overwrite=overwrite, log=log, **options)
