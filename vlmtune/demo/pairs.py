"""Preference pairs from a shapes dataset (the DPO demo): each one-image row's first question, its right answer as
the chosen reply, and the same sentence with one fact wrong (the next colour, shape or count) as the rejected one.

``python -m vlmtune.demo make-pairs data_templates/shapes`` writes ``preference-train.jsonl`` and
``preference-eval.jsonl`` there, in the ``preference_plain`` layout (image, question, chosen, rejected)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .shapes import COLOURS, SHAPES, _qa_count

_COLOUR = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_COUNT = re.compile(r"^There (?:is|are) (\d+) shapes?\.$")


def wrong_answer(answer: str) -> str:
    """The answer with one fact changed: its colour, else its count, else its shape (each to the next value)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    if found := _COLOUR.search(answer):
        after = colours[(colours.index(found[1]) + 1) % len(colours)]
        return answer[:found.start()] + after + answer[found.end():]
    if found := _COUNT.match(answer):
        return _qa_count(int(found[1]) + 1)[1]
    if found := _SHAPE.search(answer):
        after = shapes[(shapes.index(found[1]) + 1) % len(shapes)]
        return answer[:found.start()] + after + answer[found.end():]
    raise ValueError(f"no colour, count or shape to change in {answer!r}")


def _pair(row: dict) -> dict | None:
    """The plain preference row of one shapes row; None for a row with more than one image."""
    messages = [m for m in row["messages"] if m["role"] != "system"]
    parts = messages[0]["content"]
    images = [p["image"] for p in parts if p["type"] == "image"]
    if len(images) != 1:
        return None
    question = "".join(p["text"] for p in parts if p["type"] == "text")
    answer = "".join(p["text"] for p in messages[1]["content"] if p["type"] == "text")
    return {"image": images[0], "question": question, "chosen": answer, "rejected": wrong_answer(answer)}


def make_shapes_pairs(shapes_dir: str | os.PathLike) -> list[Path]:
    """Write preference-{train,eval}.jsonl beside the shapes dataset's train.jsonl and eval.jsonl (each file
    written whole: a temporary name, then renamed); returns their paths."""
    root = Path(shapes_dir)
    written = []
    for split in ("train", "eval"):
        with open(root / f"{split}.jsonl", encoding="utf-8") as f:
            pairs = [p for line in f if line.strip() and (p := _pair(json.loads(line))) is not None]
        out, tmp = root / f"preference-{split}.jsonl", root / f".preference-{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        os.replace(tmp, out)
        written.append(out)
    return written
