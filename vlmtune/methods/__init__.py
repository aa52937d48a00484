"""The method registry: one module per training method (base.Method); `get` names the known ones on a miss."""

from __future__ import annotations

from .base import Method
from .contrastive import Contrastive
from .dpo import DPO
from .sft import SFT

METHODS: dict[str, Method] = {m.name: m for m in (SFT(), DPO(), Contrastive())}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(METHODS)}") from None


def names() -> list[str]:
    return list(METHODS)
