"""ShareGPT rows, as LLaMA-Factory and ms-swift write them: text with `<image>` / `<video>` tags, media in lists.

- `{"messages" | "conversations": [{"role"|"from": ..., "content"|"value": "<image>..."}], "images": [...],
  "videos": [...], "system": "...", "tools": [...] | "[json]"}`
- ms-swift's query-response form: `{"system": ..., "query": "...", "response": "...", "history": [["q1", "r1"], ...]}`
"""

from __future__ import annotations

from ..conversation import Conversation
from .common import (
    Options,
    Resolve,
    RowError,
    chat_messages,
    finish,
    history_pairs,
    media_pools,
    tagged_turns,
    text_field,
    tools_of,
    with_row_system,
)

REQUIRED = ()
OPTIONAL = ("messages", "conversations", "images", "videos", "audios", "system", "tools", "query", "response",
            "history")
_FORMS = ("messages", "conversations", "query")


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    given = [key for key in _FORMS if row.get(key) is not None]
    if not given:
        raise RowError('missing "messages" (or "conversations") or "query" + "response": a ShareGPT row is {"messages": [{"role": "user", '
                       '"content": "<image>..."}, {"role": "assistant", ...}], "images": ["x.jpg"]}')
    if len(given) > 1:
        raise RowError(f"the row gives its conversation twice ({' and '.join(map(repr, given))}); keep one")
    stray = [key for key in ("response", "history") if row.get(key) is not None and given[0] != "query"]
    if stray:
        raise RowError(f'"{stray[0]}" belongs to the query-response form, but the row gives "{given[0]}"; '
                       "write the earlier turns into it instead")
    messages = _query_response(row) if given[0] == "query" else chat_messages(row, given[0])
    turns = tagged_turns(messages, media_pools(row, resolve, images="images", videos="videos"))
    return finish(with_row_system(row, turns), tools=tools_of(row))


def _query_response(row: dict) -> list[tuple[str, str, bool]]:
    """ms-swift's `history` pairs, then `query` and `response`, as (role, text, train) messages."""
    pairs = [*history_pairs(row, '["query", "response"]'), (text_field(row, "query"), text_field(row, "response"))]
    return [(role, text, True) for q, r in pairs for role, text in (("user", q), ("assistant", r))]
