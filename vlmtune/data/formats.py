"""Readers: data files -> Conversation, with every problem reported by file and row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .conversation import Conversation, Part, Turn
from .images import ImageProblem, resolve

FORMATS = ("messages",)


@dataclass(frozen=True)
class RowProblem:
    file: str
    row: int  # 1-based line number
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.message}"


def read_rows(path: Path, fmt: str, image_root: str | None) -> Iterator[Conversation | RowProblem]:
    """Each row of a data file as a Conversation, or a RowProblem saying what is wrong with it."""
    if fmt != "messages":
        raise ValueError(f"unknown data format {fmt!r}; supported: {', '.join(FORMATS)}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield RowProblem(str(path), line_no, f"not valid JSON ({e.msg} at column {e.colno}); "
                                 "each line must be one JSON object")
                continue
            try:
                conv = messages_row(row, path, image_root)
            except RowError as e:
                yield RowProblem(str(path), line_no, str(e))
                continue
            conv.source = f"{path}:{line_no}"
            yield conv


class RowError(ValueError):
    pass


def messages_row(row: object, path: Path, image_root: str | None) -> Conversation:
    """`{"messages": [{"role", "content": str | [typed parts]}, ...]}` -> Conversation."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise RowError('expected an object with a "messages" list, e.g. '
                       '{"messages": [{"role": "user", "content": [...]}, {"role": "assistant", ...}]}')
    turns = []
    for i, msg in enumerate(row["messages"]):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RowError(f'message {i}: expected an object with "role" and "content"')
        parts = _parts(msg["content"], i, path, image_root)
        train = msg.get("train", True)
        if not isinstance(train, bool):
            raise RowError(f'message {i}: "train" must be true or false, got {train!r}')
        turns.append(Turn(role=msg["role"], parts=parts, train=train))
    conv = Conversation(turns=turns)
    problems = conv.problems()
    if problems:
        raise RowError("; ".join(problems))
    return conv


def _parts(content: object, i: int, path: Path, image_root: str | None) -> list[Part]:
    if isinstance(content, str):
        return [Part(type="text", text=content)]
    if not isinstance(content, list):
        raise RowError(f"message {i}: content must be a string or a list of typed parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(Part(type="text", text=part["text"]))
        elif kind in ("image", "image_url"):
            ref = part.get("image", part.get("path"))
            if kind == "image_url":
                url = part.get("image_url")
                ref = url.get("url") if isinstance(url, dict) else url
            try:
                parts.append(Part(type="image", image=str(resolve(ref, path, image_root))))
            except ImageProblem as e:
                raise RowError(f"message {i} part {j}: {e}") from None
        else:
            raise RowError(f"message {i} part {j}: unknown content part {part!r}; expected "
                           '{"type": "text", "text": ...} or {"type": "image", "image": "path.png"}')
    return parts
