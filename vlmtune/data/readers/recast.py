"""Reading a row through another layout's reader (prompt/completion, Alpaca and LLaMA-Factory rows are rewritten as
`messages` or `sharegpt` rows), with the reader's "message N" in errors named as the user's own row names it."""

from __future__ import annotations

import re
from collections.abc import Callable

from ..conversation import Conversation
from .common import Options, Resolve, Row, RowError

_MESSAGE = re.compile(r"\bmessage (\d+)\b")


def read_as(reader, row: dict, resolve: Resolve, options: Options, name: Callable[[int], str],
            original: dict | None = None) -> Conversation:
    """`reader.read(row)`; `name(i)` says what message i of the rewritten row is in the `original` one, which is
    also told the keys the reader read past (reported once per file as unused)."""
    rewritten = Row(row)
    try:
        return reader.read(rewritten, resolve, options)
    except RowError as e:
        raise RowError(_MESSAGE.sub(lambda m: name(int(m.group(1))), str(e))) from None
    finally:
        if isinstance(original, Row):
            original.unused.update(rewritten.unused)
