"""LLaVA rows: `{"image": "x.jpg" | [...], "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}`."""

from __future__ import annotations

from ..conversation import Conversation
from .common import Options, Resolve, RowError, chat_messages, finish, label, media_pools, tagged_turns

REQUIRED = ("conversations",)
OPTIONAL = ("image", "id")


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    if row.get("conversations") is None:
        raise RowError(f'missing {label(row, "conversations")}: a LLaVA row is {{"image": "x.jpg", '
                       '"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}')
    messages = chat_messages(row, "conversations")
    turns = tagged_turns(messages, media_pools(row, resolve, images="image", videos=None))
    return finish(turns, id=row.get("id"))
