"""The rows the hygiene checks look at: each data row's images and text, with its file and row number."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.conversation import Conversation
from ..data.formats import READERS, read_rows, reader_options
from ..errors import VlmtuneError

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class SampleRow:
    split: str
    file: str
    row: int  # the reader's 1-based row number (a JSONL line, a JSON item, a table row)
    images: tuple[str, ...]
    text: str  # the question(s) and answer(s), or the caption; without the system prompt and data.caption_prompt
    # a row listing several answers (captions): one text per answer (question + answer); () means just (text,)
    variants: tuple[str, ...] = ()

    @property
    def texts(self) -> tuple[str, ...]:
        """The texts the CLIP score compares with the image: each listed answer's, else the row's one text."""
        return self.variants or (self.text,)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.row}"


def conversation_text(conv: Conversation, caption_prompt: str | None = None) -> str:
    """User and assistant text in order (a caption row's fixed prompt left out: the caption alone describes it)."""
    texts = []
    for turn in conv.turns:
        text = turn.text.strip()
        if turn.role == "system" or not text or (turn.role == "user" and text == caption_prompt):
            continue
        texts.append(text)
    return " ".join(texts)


def split_rows(recipe, split: str) -> list[SampleRow]:
    """The readable rows of one split (rows a reader refuses are validate's own problems, not repeated here)."""
    from ..evaluation.rows import REPLY_FIELD

    d = recipe.data
    path = getattr(d, split)
    if not path:
        return []
    if d.format not in READERS:
        raise VlmtuneError(f"data.format: the near-duplicate and CLIP-score checks read the formats "
                           f"{', '.join(READERS)}, not {d.format!r}; run them on a recipe of one of those")
    options = reader_options(d)
    out, refused = [], 0
    for item in read_rows(path, d.format, d.image_root, **options):
        if not isinstance(item, Conversation):
            refused += 1
            continue
        file, _, number = item.source.rpartition(":")
        out.append(SampleRow(split, file, int(number), tuple(item.images), conversation_text(item, d.caption_prompt)))
    if refused and d.format in REPLY_FIELD:  # rows listing several answers (captions), as contrastive data does
        return _listed_rows(split, path, d, options) or out
    return out


def _listed_rows(split: str, path, d, options: dict) -> list[SampleRow] | None:
    """The rows as `vlmtune eval` reads them (a list of answers or captions allowed); None when some row cannot be
    read that way either (validate reports it; the rows read_rows takes are checked then)."""
    from ..evaluation.rows import read_eval_rows

    try:
        rows = read_eval_rows(path, d.format, options, d.image_root).rows
    except VlmtuneError:
        return None
    out = []
    for r in rows:
        asked = conversation_text(Conversation(r.prompt.turns), d.caption_prompt)
        texts = tuple(f"{asked} {ref}".strip() for ref in r.references)
        file, _, number = r.source.rpartition(":")
        out.append(SampleRow(split, file, int(number), tuple(r.prompt.images), " | ".join(texts),
                             texts if len(texts) > 1 else ()))
    return out


def recipe_rows(recipe) -> dict[str, list[SampleRow]]:
    """Every split's rows, train first (an eval image that repeats a train image is then the later copy)."""
    return {split: split_rows(recipe, split) for split in SPLITS if getattr(recipe.data, split)}


def data_path(recipe, split: str) -> Path:
    path = getattr(recipe.data, split)
    if not path:
        raise VlmtuneError(f"data.{split} is not set: there is no {split} split to clean")
    return Path(path)
