"""The family registry: one module per family registers itself here; duplicates are rejected."""

from __future__ import annotations

from .base import Family

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


def names() -> list[str]:
    return sorted(_FAMILIES)


def all_families() -> list[Family]:
    return [_FAMILIES[n] for n in names()]


from . import llava, qwen2_vl  # noqa: E402,F401  (each registers its families)

__all__ = ["Family", "UnknownFamilyError", "register", "get", "for_model_type", "names", "all_families"]
