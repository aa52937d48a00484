"""Validation of a built recipe: every value problem at once, each naming its field and the fix."""

from __future__ import annotations

import difflib
from pathlib import Path

from ..data.formats import FIELDS
from ..data.readers import llamafactory
from ..errors import FieldError
from .distributed import distributed_errors
from .eval_fields import eval_errors
from .ranges import BOUNDS
from .schema import CHOICES, Recipe, describe, numeric_fields, show


def _number_errors(recipe: Recipe) -> list[FieldError]:
    """Each number field against its BOUNDS entry: finite and in range."""
    errs = []
    for path, kind in numeric_fields().items():
        section, _, key = path.rpartition(".")
        value = getattr(getattr(recipe, section) if section else recipe, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # a Recipe built in code, not from YAML
            errs.append(FieldError(path, f"must be {describe(kind)}, got {show(value)}"))
            continue
        problem = BOUNDS[path].problem(value, kind is int)
        if problem:
            errs.append(FieldError(path, problem))
    return errs


def validate(recipe: Recipe, check_paths: bool = True) -> list[FieldError]:
    """Every value problem in a built recipe (types were checked while building)."""
    errs: list[FieldError] = []

    def need(cond: bool, path: str, message: str) -> None:
        if not cond:
            errs.append(FieldError(path, message))

    for path, choices in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(recipe, section), key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            need(False, path, f"must be one of {', '.join(choices)}, got {show(value)}{hint}")
    errs.extend(_number_errors(recipe))

    m, lo, d, t = recipe.model, recipe.lora, recipe.data, recipe.train
    need(bool(m.name_or_path), "model.name_or_path", "is required: a Hugging Face model id, a local model folder, "
         "or a built-in tiny model (builtin:tiny-qwen2-vl)")
    known = _model_families(recipe.method)
    need(m.family == "auto" or m.family in known, "model.family",
         f"must be auto or one of {', '.join(known)}, got {show(m.family)}")
    need(lo.target_modules is None or len(lo.target_modules) > 0, "lora.target_modules",
         "must name at least one module, or be left out for the family default")
    for prefix in ("", "video_"):  # image and per-frame video bounds
        lo_px, hi_px = getattr(d, f"{prefix}min_pixels"), getattr(d, f"{prefix}max_pixels")
        if lo_px and hi_px:
            need(lo_px <= hi_px, f"data.{prefix}min_pixels",
                 f"must not exceed data.{prefix}max_pixels ({lo_px} > {hi_px})")
    need(bool(d.train), "data.train", "is required: the path of the training data file (JSONL)")
    errs.extend(_columns_errors(d.columns, d.format))
    if check_paths:
        for key in ("train", "eval"):
            value = getattr(d, key)
            if value and llamafactory.reference(value) is not None:  # dir/dataset_info.json#name
                errs.extend(FieldError(f"data.{key}", p) for p in llamafactory.problems(value))
            elif value and not (Path(value).is_file() or Path(value).is_dir()):  # a folder: a datasets dataset
                need(False, f"data.{key}", f"file not found: {value}")
        if d.image_root and not Path(d.image_root).is_dir():
            need(False, "data.image_root", f"folder not found: {d.image_root}")
        errs.extend(FieldError(*p) for p in llamafactory.setting_problems([d.train, d.eval], d.format, d.columns))
    need(t.num_train_epochs != 0 or t.max_steps > 0, "train.num_train_epochs",  # other values: BOUNDS
         "must be positive (or set train.max_steps)")
    need(t.eval_steps is None or bool(d.eval), "train.eval_steps", "needs data.eval (an evaluation file)")
    need(d.prefetch_factor is None or d.num_workers != 0, "data.prefetch_factor",
         "needs DataLoader workers: set data.num_workers to 1 or more (or leave it unset), or leave prefetch_factor out")
    need(bool(recipe.output_dir), "output_dir", "is required")
    errs.extend(distributed_errors(recipe, check_paths))
    errs.extend(_method_errors(recipe, check_paths))
    errs.extend(eval_errors(recipe))
    return errs


def _method_errors(recipe: Recipe, check_paths: bool) -> list[FieldError]:
    """`method` one of the registry's, and each method's own rules (its section; shared fields it cannot use)."""
    from .. import methods

    if recipe.method not in methods.names():
        close = difflib.get_close_matches(str(recipe.method), methods.names(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [FieldError("method", f"must be one of {', '.join(methods.names())}, got {show(recipe.method)}{hint}")]
    return [e for m in methods.METHODS.values() for e in m.validate(recipe, check_paths)]


def _model_families(method: str) -> list[str]:
    """The family names model.family may take under a method: its own (a dual encoder's), else the VLM families."""
    from .. import families, methods

    own = methods.get(method).model_families() if method in methods.names() else None
    return own if own is not None else families.names()


def _columns_errors(columns: object, fmt: str) -> list[FieldError]:
    """data.columns: a mapping from the format's field names to column names."""
    if columns is None:
        return []
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        return [FieldError("data.columns", f"must map field names to column names, e.g. {{image: img}}, got {columns!r}")]
    known = FIELDS.get(fmt, ())
    return [FieldError(f"data.columns.{key}", f"is not a field of format {fmt}; its fields: {', '.join(known)}")
            for key in columns if fmt in FIELDS and key not in known]
