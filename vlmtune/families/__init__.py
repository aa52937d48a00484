"""The family registry: one module per family registers itself here; duplicates are rejected."""

from __future__ import annotations

from .base import Family, ImagePlan, PixelKnobs

_FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


class UnknownFamilyError(ValueError):
    pass


def register(family: Family) -> Family:
    """Add a family; a second family with the same name or model_type is an error."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    for model_type in family.model_types:
        if model_type in _BY_MODEL_TYPE:
            owner = _BY_MODEL_TYPE[model_type].name
            raise ValueError(f"model_type {model_type!r} is already handled by family {owner!r}")
    _FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    return family


def get(name: str) -> Family:
    """The family called `name`."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown model family {name!r}; supported: {', '.join(names())}") from None


def for_model_type(model_type: str) -> Family:
    """The family that handles a config's `model_type`."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnknownFamilyError(
            f"model_type {model_type!r} is not a supported family; supported model types: "
            f"{', '.join(sorted(_BY_MODEL_TYPE))}"
        ) from None


def by_tiny_name(name: str) -> Family:
    """The family whose tiny offline test model is called `name` (e.g. tiny-qwen2-vl)."""
    for family in _FAMILIES.values():
        if family.tiny_name == name:
            return family
    raise UnknownFamilyError(f"unknown builtin model {name!r}; known: {', '.join(tiny_names())}")


def tiny_names() -> list[str]:
    return sorted(f.tiny_name for f in _FAMILIES.values() if f.tiny_name)


def names() -> list[str]:
    return sorted(_FAMILIES)


def all_families() -> list[Family]:
    return [_FAMILIES[n] for n in names()]


# One line per family module; each module's FAMILIES are registered in this order.
FAMILY_MODULES = (
    "qwen2_vl",
    "llava",
    "internvl",
    "qwen3_vl",
    "gemma3",
    "smolvlm",
)


def _register_modules() -> None:
    import importlib

    for module in FAMILY_MODULES:
        for family in importlib.import_module(f"{__name__}.{module}").FAMILIES:
            register(family)


_register_modules()

__all__ = ["Family", "ImagePlan", "PixelKnobs", "FAMILY_MODULES", "by_tiny_name", "tiny_names", "UnknownFamilyError", "register", "get", "for_model_type", "names", "all_families"]
