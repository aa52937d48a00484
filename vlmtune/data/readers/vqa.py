"""VQA rows: `{"image": "x.jpg" | [...], "question": "...", "answer": "..."}` -> one question, one answer."""

from __future__ import annotations

from ..conversation import Conversation
from .common import Options, Resolve, single_turn, text_field

REQUIRED = ("image", "question", "answer")
OPTIONAL = ()


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    return single_turn(row, resolve, text_field(row, "question"), "answer")
