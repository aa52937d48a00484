"""Captioning rows: `{"image": "x.jpg", "caption": "..."}`; the user prompt is the recipe's `data.caption_prompt`."""

from __future__ import annotations

from ..conversation import Conversation
from .common import Options, Resolve, single_turn

REQUIRED = ("image", "caption")
OPTIONAL = ()


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    return single_turn(row, resolve, options.caption_prompt, "caption")
