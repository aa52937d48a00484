"""Retrieval-augmented prompts: the top-k images of an image index for the question's text (embedded with the
model that built the index), put before the question as a prompt's images are, and checked against the VLM's
token budget (data.max_length as the VLM was trained, from its vlmtune.json). A data file's rows each get their own
top-k for their last user turn's text, put at the start of that turn."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..data.conversation import Part, Turn
from ..data.images import ImageProblem, image_size
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
    return retrieve_all(index, [question], k)[0]


def retrieve_all(index, questions: list[str], k: int = 4, batch_size: int = 64) -> list[list[Retrieved]]:
    """The k images of `index` nearest each of the texts `questions` (embedded `batch_size` at a time), best first."""
    from ..embedding import embed_texts

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
    model, processor, _ = index.model
    scores, rows = index.search_vectors(embed_texts(model, processor, questions, batch_size), k)
    return [[Retrieved(index.paths[r], float(s)) for s, r in zip(row_scores, row_ids, strict=True) if r >= 0]
            for row_scores, row_ids in zip(scores, rows, strict=True)]


def question_of(prompt: Prompt) -> str:
    """The text a data row's images are retrieved for: its last user turn's."""
    return next((t.text for t in reversed(prompt.turns) if t.role == "user"), "").strip()


def check_retrievable(prompts: list[Prompt]) -> None:
    """Every data row can take retrieved images: it has a user question and no images of its own (one error)."""
    bad = [f"{p.source}: {len(p.images)} image(s) of its own" if p.images else f"{p.source}: no user text"
           for p in prompts if p.images or not question_of(p)]
    if bad:
        shown = "\n".join(f"  - {b}" for b in bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise VlmtuneError(f"--retrieve gives each row of --data the index's images for its last user turn's text, "
                           f"so rows need a question and no images; {len(bad)} row(s) do not fit:\n{shown}\n"
                           "remove their images (or the rows), or predict them without --retrieve")


def with_images(prompt: Prompt | str, paths: list[str]) -> Prompt:
    """A question (a prompt of its own) or a data row's prompt with `paths` at the start of its last user turn."""
    if isinstance(prompt, str):
        return single_prompt(paths, prompt)
    for p in paths:
        try:
            image_size(Path(p))
        except ImageProblem as e:
            raise VlmtuneError(str(e)) from None
    last = max(i for i, t in enumerate(prompt.turns) if t.role == "user")
    turn = prompt.turns[last]
    turns = [*prompt.turns[:last], Turn(turn.role, [*(Part(type="image", image=p) for p in paths), *turn.parts],
                                        turn.train), *prompt.turns[last + 1:]]
    return Prompt(turns, prompt.row, prompt.reference, prompt.source, list(prompt.tools))


def retrieval_prompt(loaded: Loaded, question: Prompt | str, hits: list[Retrieved], index_folder,
                     max_length: int | None = None) -> Prompt:
    """The prompt a row with these images (best first) and the question (or a data row's prompt) makes;
    VlmtuneError when its tokens do not fit the VLM's max_length, with the largest k that does."""
    where = "" if isinstance(question, str) else f"{question.source}: "
    try:
        prompt = with_images(question, [h.path for h in hits])
    except VlmtuneError as e:
        raise VlmtuneError(f"{where}an image retrieved from the index at {index_folder} cannot be read: {e}; rebuild "
                           "the index") from None
    limit = max_length or model_max_length(loaded)
    length = len(encode(loaded, prompt).input_ids)
    if length <= limit:
        return prompt
    fits = next((j for j in range(len(hits) - 1, 0, -1)
                 if len(encode(loaded, with_images(question, [h.path for h in hits[:j]])).input_ids) <= limit), 0)
    hint = (f"give -k {fits} or fewer" if fits else "even one image does not fit: shorten the question or use a VLM "
            "trained with a larger data.max_length")
    raise VlmtuneError(f"{where}the prompt with {len(hits)} retrieved images from the index at {index_folder} is "
                       f"{length} tokens, over the VLM's data.max_length={limit}; {hint}")


def model_max_length(loaded: Loaded) -> int:
    """data.max_length as the VLM was trained (its vlmtune.json), else the recipe default."""
    from ..config.schema import DataConfig

    return int(loaded.meta.get("max_length") or DataConfig.max_length)


def render_retrieved(record: dict) -> str:
    """The lines `vlmtune predict --retrieve` prints under the answer: each image given, with its score."""
    lines = [f"retrieved images ({len(record['retrieved'])}, best first):"]
    lines += [f"  {i}. {r['score']:.4f}  {r['path']}" for i, r in enumerate(record["retrieved"], 1)]
    return "\n".join(lines)
