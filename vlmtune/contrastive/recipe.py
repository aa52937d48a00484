"""A contrastive recipe: the shared recipe sections (model, lora, data, train, output_dir) plus what only a dual
encoder has: `method: contrastive`, the `contrastive:` section and `lora.towers`.

Until the method registry (vlmtune/methods) carries a `contrastive` method, these three are taken out here and the
rest is read and validated by the shared loader, so every shared field means what it means for the VLMs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import FieldError, Recipe, RecipeError, apply_overrides, load_recipe, paths_resolved
from ..embedding import registry
from ..embedding.registry import LOSSES, TOWERS, EmbeddingFamily

METHOD = "contrastive"


@dataclass
class ContrastiveConfig:
    """The recipe's `contrastive:` section."""

    loss: str = "auto"  # auto (the family's: clip infonce, siglip sigmoid) | infonce | sigmoid
    gather: bool = True  # in-batch negatives from every process (embeddings gathered with their gradients)
    eval_batch_size: int = 64  # images (texts) embedded at a time for recall@k


@dataclass
class ContrastiveRecipe:
    recipe: Recipe  # the shared sections
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    towers: str = "both"  # lora.towers: both | vision | text
    family: str = "auto"  # model.family: an embedding family, or auto (from the model's config)

    def loss_for(self, family: EmbeddingFamily) -> str:
        return family.loss if self.contrastive.loss == "auto" else self.contrastive.loss

    def to_dict(self) -> dict:
        out = {**self.recipe.to_dict(), "method": METHOD, "contrastive": vars(self.contrastive).copy()}
        out["model"]["family"] = self.family
        out["lora"]["towers"] = self.towers
        return out


def load_contrastive_recipe(path=None, overrides: dict | list[str] | None = None, check_paths: bool = True,
                            raw: dict | None = None) -> ContrastiveRecipe:
    """Read a contrastive recipe YAML (or the mapping `raw`), apply overrides and validate: RecipeError listing
    every problem."""
    errors: list[FieldError] = []
    source = str(path) if path is not None else None
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError([FieldError("", f"cannot read the recipe: {e}")], source) from None
        raw = paths_resolved("", raw, Path(path).parent)
    raw = apply_overrides(raw or {}, overrides or {}, errors)
    if raw.get("method", METHOD) != METHOD:
        errors.append(FieldError("method", f"this loader reads method: {METHOD} recipes, got {raw.get('method')!r}"))
    raw.pop("method", None)
    section = raw.pop(METHOD, None) or {}
    towers = (raw.get("lora") or {}).pop("towers", "both")
    family = (raw.get("model") or {}).pop("family", "auto")
    settings = _settings(section, errors)
    flat = {f"{k}.{f}": v for k, sub in raw.items() if isinstance(sub, dict) for f, v in sub.items()}
    flat |= {k: v for k, v in raw.items() if not isinstance(v, dict)}
    recipe = None
    try:
        recipe = load_recipe(None, flat, check_paths=check_paths)
    except RecipeError as e:
        errors.extend(e.errors)
    if towers not in TOWERS:
        errors.append(FieldError("lora.towers", f"must be one of {', '.join(TOWERS)}, got {towers!r}"))
    if family != "auto" and not registry.is_embedding_family(family):
        errors.append(FieldError("model.family", f"must be auto or an embedding family "
                                 f"({', '.join(registry.names())}), got {family!r}"))
    if recipe is not None:
        errors.extend(_shared_field_errors(recipe))
    if errors:
        raise RecipeError(errors, source)
    out = ContrastiveRecipe(recipe, settings, towers, family)
    recipe.source = source
    return out


def _settings(section: object, errors: list[FieldError]) -> ContrastiveConfig:
    if not isinstance(section, dict):
        errors.append(FieldError(METHOD, "must be a mapping (loss, gather, eval_batch_size)"))
        return ContrastiveConfig()
    known = set(vars(ContrastiveConfig()))
    for key in sorted(set(section) - known):
        errors.append(FieldError(f"{METHOD}.{key}", f"unknown field; the section takes {', '.join(sorted(known))}"))
    settings = ContrastiveConfig(**{k: v for k, v in section.items() if k in known})
    if settings.loss not in ("auto", *LOSSES):
        errors.append(FieldError(f"{METHOD}.loss", f"must be auto, {', '.join(LOSSES)}; got {settings.loss!r}"))
    if not isinstance(settings.gather, bool):
        errors.append(FieldError(f"{METHOD}.gather", f"must be true or false, got {settings.gather!r}"))
    if not isinstance(settings.eval_batch_size, int) or settings.eval_batch_size < 1:
        errors.append(FieldError(f"{METHOD}.eval_batch_size", f"must be a positive integer, got "
                                 f"{settings.eval_batch_size!r}"))
    return settings


def _shared_field_errors(recipe: Recipe) -> list[FieldError]:
    """Shared fields a contrastive run cannot use, each with its fix."""
    errs = []
    if recipe.data.format != "caption":
        errs.append(FieldError("data.format", "must be caption for method contrastive (image-caption rows; "
                               f"data.columns maps image and caption to your columns), got {recipe.data.format!r}"))
    if recipe.quantization.mode == "8bit":
        errs.append(FieldError("quantization.mode", "8bit is not supported for method contrastive; use 4bit "
                               "(QLoRA) or none"))
    if recipe.train.packing:
        errs.append(FieldError("train.packing", "does not apply to method contrastive (no token sequences); remove it"))
    if recipe.train.resume_from_checkpoint:
        errs.append(FieldError("train.resume_from_checkpoint", "method contrastive writes no checkpoints yet (a run "
                               "is minutes at base size): remove it and rerun"))
    if recipe.distributed.deepspeed != "none":
        errs.append(FieldError("distributed.deepspeed", "is not wired for method contrastive yet: use several "
                               "processes without DeepSpeed (torchrun; the negatives are gathered across them)"))
    return errs
