"""ShareGPT rows: `{"messages" | "conversations": [{"role"|"from", "content"|"value"}], "images": [...]}`."""

from __future__ import annotations

from ..conversation import Conversation
from .common import Options, Resolve, RowError, chat_messages, finish, image_refs, tagged_turns

REQUIRED = ()
OPTIONAL = ("messages", "conversations", "images")


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    key = "messages" if row.get("messages") is not None else "conversations"
    if row.get(key) is None:
        raise RowError('missing "messages" (or "conversations"): a ShareGPT row is {"messages": [{"role": "user", '
                       '"content": "<image>..."}, {"role": "assistant", ...}], "images": ["x.jpg"]}')
    messages = chat_messages(row[key], key)
    return finish(tagged_turns(messages, image_refs(row.get("images"), "images"), resolve, "images"))
