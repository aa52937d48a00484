"""vlmtune: LoRA and QLoRA fine-tuning of vision-language models from one YAML recipe."""

__version__ = "0.1.0"

from .config import Recipe, RecipeError, load_recipe  # noqa: E402
from .errors import PreflightError, VlmtuneError  # noqa: E402


def train(recipe, log=print):
    """Check the recipe, model and data, train, and write the adapter folder (see vlmtune.training)."""
    from .training import train as _train

    return _train(recipe, log=log)


def plan(recipe):
    """Check model, machine and every data row without training; returns the Plan or raises PreflightError."""
    from .preflight import plan_run

    return plan_run(recipe)


__all__ = ["Recipe", "RecipeError", "PreflightError", "VlmtuneError", "load_recipe", "train", "plan", "__version__"]
