"""vlmtune: LoRA and QLoRA fine-tuning of vision-language models from one YAML recipe."""

__version__ = "0.1.0"

from .config import Recipe, RecipeError, load_recipe  # noqa: E402
from .errors import PreflightError, VlmtuneError  # noqa: E402


def train(recipe, log=print, overwrite: bool = False):
    """Check the recipe, model and data, train, and write the adapter folder (see vlmtune.training).

    overwrite: replace a run already in output_dir (it stays whole until the new one is complete)."""
    from .training import train as _train

    return _train(recipe, log=log, overwrite=overwrite)


def plan(recipe):
    """Check model, machine and every data row without training; returns the Plan or raises PreflightError."""
    from .preflight import plan_run

    return plan_run(recipe)


def inspect(recipe, num: int = 3, index: int | None = None):
    """Formatted samples with supervised tokens highlighted (HTML in Jupyter, text with print); preference data
    shows each pair's prompt once and both replies."""
    from .pair_inspection import inspect_recipe as _inspect

    return _inspect(recipe, num=num, index=index)


def validate(recipe, decode_images: bool = False):
    """Check every data row without a GPU; returns a ValidationReport (`.ok`, `.render()`)."""
    from .validation import validate as _validate

    return _validate(recipe, decode_images=decode_images)


def predict(model, images=None, prompt=None, data=None, out=None, **kwargs):
    """Generate with a merged model or base + adapter for one prompt or a data file (see vlmtune.inference);
    `retrieve=INDEX, k=4` answers the prompt with an image index's top-k images for it (vlmtune index build)."""
    from .inference import predict as _predict

    return _predict(model, images=images, prompt=prompt, data=data, out=out, **kwargs)


def evaluate(model, data, **kwargs):
    """Score a model or adapter on a data file, against its bare base by default (see vlmtune.evaluation)."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(model, data, **kwargs)


def training_curves(run, title=None):
    """A run's (or checkpoint's) training curves as a matplotlib Figure: every logged series (see vlmtune.curves)."""
    from .curves import training_curves as _curves

    return _curves(run, title=title)


def merge_adapter(adapter_dir, out, **kwargs):
    """Merge an adapter into its full-precision base shard by shard, with a parity check (see vlmtune.merge)."""
    from .merge import merge_adapter as _merge

    return _merge(adapter_dir, out, **kwargs)


__all__ = ["Recipe", "RecipeError", "PreflightError", "VlmtuneError", "load_recipe", "train", "plan", "inspect", "validate", "predict", "evaluate", "training_curves", "merge_adapter", "__version__"]
