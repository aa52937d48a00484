"""Reading a recipe: YAML, `key=value` overrides, the path rule, then every error at once (RecipeError)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from pathlib import Path

import yaml

from ..errors import FieldError
from .paths import paths_resolved
from .schema import ALIASES, Recipe, describe, schema, show
from .validate import validate


class RecipeError(ValueError):
    """Every problem found in a recipe, each naming its field and the fix."""

    def __init__(self, errors: list[FieldError], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} problem{'s' if len(errors) != 1 else ''}{where}:\n{lines}")


def load_recipe(path: str | os.PathLike | None = None, overrides: dict | list[str] | None = None,
                check_paths: bool = True) -> Recipe:
    """Read a recipe YAML (or start from defaults), apply overrides, validate; raise RecipeError with all errors."""
    raw: dict = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError([FieldError("", f"recipe file not found: {path}")]) from None
        except IsADirectoryError:
            raise RecipeError([FieldError("", f"{path} is a folder; give the recipe's YAML file")]) from None
        except UnicodeDecodeError as e:
            raise RecipeError([FieldError("", f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8")]) from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise RecipeError([FieldError("", f"not valid YAML: {e}")], source) from None
        if not isinstance(raw, dict):
            raise RecipeError([FieldError("", "the recipe must be a mapping of sections (model, data, ...)")], source)
    errors: list[FieldError] = []
    if source:
        raw = paths_resolved("", raw, Path(source).parent)
    raw = method_defaults(apply_overrides(raw, overrides or {}, errors))
    recipe = _build(Recipe, raw, "", errors)
    recipe.source = source
    errors.extend(validate(recipe, check_paths=check_paths))
    if errors:
        raise RecipeError(errors, source)
    return recipe


def method_defaults(raw: dict) -> dict:
    """The recipe's method's own defaults (Method.defaults) put in where the recipe leaves those fields unset."""
    from .. import methods

    method = methods.METHODS.get(raw.get("method", Recipe.method)) if isinstance(raw.get("method", ""), str) else None
    if method is None or not method.defaults:
        return raw
    raw = copy.deepcopy(raw)
    for key, value in method.defaults.items():
        node = raw
        *sections, field = key.split(".")
        for part in sections:
            if not isinstance(node.get(part, {}), dict):
                break  # a malformed section: _build names it
            node = node.setdefault(part, {})
        else:
            node.setdefault(field, value)
    return raw


def apply_overrides(raw: dict, overrides: dict | list[str], errors: list[FieldError]) -> dict:
    """`["train.learning_rate=1e-4", ...]` or `{"train.learning_rate": 1e-4}` merged into the raw mapping."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for item in overrides:
            if "=" not in item:
                errors.append(FieldError(item, "an override must look like section.key=value, e.g. train.max_steps=10"))
                continue
            key, value = item.split("=", 1)
            try:
                parsed.append((key.strip(), yaml.safe_load(value) if value.strip() else None))
            except yaml.YAMLError:
                errors.append(FieldError(key.strip(), f"the override value {value!r} is not valid YAML; quote it, "
                                         f"e.g. {key.strip()}='{value}'"))
        items = parsed
    for key, value in items:
        value = paths_resolved(key, value, Path.cwd())  # a path typed on the command line: where it was typed
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _build(cls, raw: object, prefix: str, errors: list[FieldError]):
    """Instantiate a dataclass section from raw YAML, recording type errors and unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(FieldError(prefix.rstrip("."), f"must be a mapping, got {show(raw)}"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            errors.append(FieldError(path, f"unknown key; {_unknown_key_hint(str(key), prefix, list(fields))}"))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, path + ".", errors)
            continue
        value = ALIASES.get(path, {}).get(value, value) if _hashable(value) else value
        ok, converted = _convert(value, hint)
        if not ok:
            errors.append(FieldError(path, f"must be {describe(hint)}, got {show(value)}"))
            continue
        values[key] = converted
    return cls(**values)


def _unknown_key_hint(key: str, prefix: str, known: list[str]) -> str:
    """Where the key belongs: the same name in another section, else a close spelling here, else anywhere."""
    elsewhere = [p for p in schema() if p.rpartition(".")[2] == key]
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere)}?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    names = {p.rpartition(".")[2]: p for p in schema()}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.75)
    return f"did you mean {names[close[0]]}?" if close else f"known keys: {', '.join(known)}"


def _convert(value, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, v = _convert(value, arg)
            if ok:
                return True, v
        return False, None
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return False, None
        out = []
        for item in value:
            ok, v = _convert(item, args[0])
            if not ok:
                return False, None
            out.append(v)
        return True, out
    if hint is bool:
        return (True, value) if isinstance(value, bool) else (False, None)
    if hint is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if hint is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    return True, value


def _hashable(value) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def dump(recipe: Recipe) -> str:
    """The recipe as YAML (what a run saves as recipe.yaml)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
