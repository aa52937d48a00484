"""Alpaca rows: `{"instruction": "...", "input"?: "...", "output": "...", "system"?: "...", "history"?: [[q, a], ...],
"images"?: [...]}`, as LLaMA-Factory reads them.

The user turn is the instruction and the input joined by a newline (either may be empty); `history` pairs are the
earlier turns (their replies are trained on like every reply); `system` is the system prompt. Images and
`<image>` tags work as in `sharegpt`, which also reads `videos`, `audios` and `tools` as it does its own.
"""

from __future__ import annotations

from ..conversation import Conversation
from . import sharegpt
from .common import Options, Resolve, RowError, history_pairs, label, text_field
from .recast import read_as

REQUIRED = ("instruction", "output")
_PASSED = tuple(f for f in ("images", "videos", "audios", "tools") if f in sharegpt.OPTIONAL)  # handed on as they are
OPTIONAL = ("input", "system", "history", *_PASSED)


def read(row: dict, resolve: Resolve, options: Options) -> Conversation:
    instruction, query, output = text_field(row, "instruction"), _optional_text(row, "input"), text_field(row, "output")
    if not output.strip():
        raise RowError(f"{label(row, 'output')} is empty: there is nothing to train on")
    system = _optional_text(row, "system")
    history = history_pairs(row, "[question, answer]")
    names = ["system"] if system else []
    msgs = [{"role": "system", "content": system}] if system else []
    for k, (question, answer) in enumerate(history):
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        names += [f"history[{k}] question", f"history[{k}] answer"]
    msgs += [{"role": "user", "content": "\n".join(t for t in (instruction, query) if t)},
             {"role": "assistant", "content": output}]
    names += ["the instruction", "the output"]
    passed = {f: row[f] for f in _PASSED if row.get(f) is not None}
    return read_as(sharegpt, {"messages": msgs, **passed}, resolve, options,
                   lambda i: names[i] if i < len(names) else f"message {i}")


def _optional_text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise RowError(f"{label(row, key)} must be a string, got {value!r}"[:300])
    return value or ""
