"""Supervised fine-tuning: TRL's SFTTrainer on vlmtune's formatted examples (labels on the replies only).

Its trainer is still built by vlmtune/training.py (build_trainer's own path): moving it here is the next step."""

from __future__ import annotations

from ..data.preference import is_pair_format
from ..errors import FieldError
from .base import Method


class SFT(Method):
    name = "sft"
    builds_trainer = False  # training.build_trainer's SFT path

    def validate(self, recipe, check_paths=True) -> list[FieldError]:
        if recipe.method == self.name and is_pair_format(recipe.data.format):
            return [FieldError("data.format", f"{recipe.data.format} holds preference pairs: set method: dpo "
                               "(or `vlmtune dpo`), or give SFT rows")]
        return []
