"""Plain preference rows: `{"image": "x.jpg" | [...], "question": "...", "chosen": "...", "rejected": "..."}`.

Read as `vqa` reads a row, once with each reply: one user turn (the images, then the question) and the reply."""

from __future__ import annotations

from ..conversation import ConversationPair
from .common import Options, Resolve, single_turn, text_field
from .preference import SIDES, pair_of

REQUIRED = ("image", "question", "chosen", "rejected")
OPTIONAL = ()


def read(row: dict, resolve: Resolve, options: Options) -> ConversationPair:
    question = text_field(row, "question")
    return pair_of(row, {side: single_turn(row, resolve, question, side) for side in SIDES})
