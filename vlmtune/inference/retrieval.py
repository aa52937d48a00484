"""Retrieval-augmented prompts: the top-k images of an image index for the question's text (embedded with the
model that built the index), put before the question as a prompt's images are, and checked against the VLM's
token budget (data.max_length as the VLM was trained, from its vlmtune.json)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import VlmtuneError
from .generation import encode
from .load import Loaded, quiet_loading
from .prompts import Prompt, single_prompt


@dataclass(frozen=True)
class Retrieved:
    path: str
    score: float  # cosine similarity of the image and the question under the index's model

    def to_dict(self) -> dict:
        return {"path": self.path, "score": self.score}


def open_index(index):
    """An ImageIndex: given one, or loaded from its folder."""
    from ..index import ImageIndex, load_index

    return index if isinstance(index, ImageIndex) else load_index(Path(index))


def retrieve(index, question: str, k: int = 4) -> list[Retrieved]:
    """The k images of `index` (a folder or an ImageIndex) nearest the text `question`, best first."""
    index = open_index(index)
    if k <= 0:
        raise VlmtuneError(f"-k must be at least 1, got {k}")
    if k > len(index.paths):
        raise VlmtuneError(f"-k {k} asks for more images than the index at {index.folder} holds ({len(index.paths)}); "
                           f"give -k {len(index.paths)} or fewer")
    try:
        with quiet_loading():
            index.model  # noqa: B018 - loads the index's embedding model once
    except (VlmtuneError, OSError, ValueError) as e:
        raise VlmtuneError(f"the index at {index.folder} was built with the model {index.manifest.get('model')!r} "
                           f"(its manifest.json), which cannot be loaded: {e}; put that model back where it was, "
                           "or rebuild the index with `vlmtune index build --model ... --overwrite`") from None
    if not index.complete:  # a build that was stopped: its images embedded so far are searched
        print(f"predict: the index at {index.folder} is not complete ({len(index.paths)} of "
              f"{index.manifest.get('count')} images embedded); rerun its `vlmtune index build` to finish it",
              file=sys.stderr)
    return [Retrieved(path, score) for path, score in index.search(question, k)]


def retrieval_prompt(loaded: Loaded, question: str, hits: list[Retrieved], index_folder,
                     max_length: int | None = None) -> Prompt:
    """The prompt a row with these images (best first) and the question makes; VlmtuneError when its tokens do not
    fit the VLM's max_length, with the largest k that does."""
    try:
        prompt = single_prompt([h.path for h in hits], question)
    except VlmtuneError as e:
        raise VlmtuneError(f"an image retrieved from the index at {index_folder} cannot be read: {e}; rebuild the index") from None
    limit = max_length or model_max_length(loaded)
    length = len(encode(loaded, prompt).input_ids)
    if length <= limit:
        return prompt
    fits = next((j for j in range(len(hits) - 1, 0, -1)
                 if len(encode(loaded, single_prompt([h.path for h in hits[:j]], question)).input_ids) <= limit), 0)
    hint = (f"give -k {fits} or fewer" if fits else "even one image does not fit: shorten the question or use a VLM "
            "trained with a larger data.max_length")
    raise VlmtuneError(f"the prompt with {len(hits)} retrieved images from the index at {index_folder} is {length} tokens, over "
                       f"the VLM's data.max_length={limit}; {hint}")


def model_max_length(loaded: Loaded) -> int:
    """data.max_length as the VLM was trained (its vlmtune.json), else the recipe default."""
    from ..config.schema import DataConfig

    return int(loaded.meta.get("max_length") or DataConfig.max_length)


def render_retrieved(record: dict) -> str:
    """The lines `vlmtune predict --retrieve` prints under the answer: each image given, with its score."""
    lines = [f"retrieved images ({len(record['retrieved'])}, best first):"]
    lines += [f"  {i}. {r['score']:.4f}  {r['path']}" for i, r in enumerate(record["retrieved"], 1)]
    return "\n".join(lines)
