"""The recipe: its schema (`schema`), reading YAML and overrides (`load`), and validation that reports every
error at once (`validate`, with `ranges`, `paths` and `distributed` for the rules of their fields)."""

from ..errors import FieldError
from .load import RecipeError, apply_overrides, dump, load_recipe
from .paths import PATH_FIELDS, paths_resolved
from .ranges import BOUNDS, Bound
from .schema import (
    ALIASES,
    CHOICES,
    DataConfig,
    DistributedConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    Recipe,
    TrainConfig,
    numeric_fields,
    schema,
)
from .validate import validate

__all__ = ["ALIASES", "BOUNDS", "CHOICES", "PATH_FIELDS", "Bound", "DataConfig", "DistributedConfig", "FieldError",
           "LoraConfig", "ModelConfig", "QuantizationConfig", "Recipe", "RecipeError", "TrainConfig",
           "apply_overrides", "dump", "load_recipe", "numeric_fields", "paths_resolved", "schema", "validate"]
