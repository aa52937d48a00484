"""Show samples as the model will see them: supervised tokens highlighted, image runs collapsed."""

from __future__ import annotations

import dataclasses
import html
import itertools
from dataclasses import dataclass, field

from .config import Recipe
from .data.conversation import Conversation, Part, Turn
from .data.formats import reader_options
from .data.formatting import IGNORE_INDEX
from .data.prepare import iter_rows
from .data.prepared_cache import data_files
from .errors import VlmtuneError
from .preflight import check_data, formatting_for

GREEN, DIM, CYAN, RESET = "\033[42;30m", "\033[2m", "\033[36m", "\033[0m"


@dataclass
class SampleView:
    index: int
    source: str
    input_ids: list[int]
    labels: list[int]
    num_image_tokens: int
    dropped: bool
    problem: str | None
    media: list = field(default_factory=list)  # (first token, end token, kind) per image / video

    def to_json(self) -> dict:
        return {"index": self.index, "input_ids": self.input_ids, "labels": self.labels,
                "num_image_tokens": self.num_image_tokens, "dropped": self.dropped, "source": self.source,
                "problem": self.problem}

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class Inspection:
    """Samples of a recipe's training data with the tokenizer to render them; shows itself in Jupyter as HTML."""

    samples: list[SampleView]
    tokenizer: object
    notes: list[str]

    def runs(self, s: SampleView, start: int = 0):
        """(kind, text) pieces from token `start` on: kind is 'image' (an image's or video's whole token sequence),
        'train' or 'prompt'."""
        media = {}
        for a, b, k in s.media:
            media.update({i: (k, a) for i in range(a, b)})

        def kind(i):
            if i in media:
                return media[i]
            return "train" if s.labels[i] != IGNORE_INDEX else "prompt"

        for k, group in itertools.groupby(range(start, len(s.input_ids)), key=kind):
            n = sum(1 for _ in group)
            if isinstance(k, tuple):
                yield "image", f"<{k[0]} ×{n}>"
            else:
                yield k, self._text_of(s.input_ids, start, start + n)
            start += n

    def _text_of(self, ids: list[int], start: int, end: int) -> str:
        """Text of ids[start:end] in context: decoded alone, SentencePiece drops a run's leading space."""
        context = max(0, start - 8)
        before = self.tokenizer.decode(ids[context:start])
        whole = self.tokenizer.decode(ids[context:end])
        return whole[len(before):] if whole.startswith(before) else self.tokenizer.decode(ids[start:end])

    def stats(self, s: SampleView) -> str:
        state = "DROPPED: " + (s.problem or "") if s.dropped else (s.problem or "kept")
        return (f"#{s.index} {s.source}: {len(s.input_ids)} tokens, {s.num_image_tokens} image tokens, "
                f"{s.num_supervised} supervised; {state}")

    def render(self, color: bool = True) -> str:
        out = [f"note: {n}" for n in self.notes]
        for s in self.samples:
            out.append(("" if not color else CYAN) + self.stats(s) + (RESET if color else ""))
            pieces = []
            for k, text in self.runs(s):
                if not color:
                    pieces.append(f"[[{text}]]" if k == "train" else text)
                else:
                    pieces.append({"train": GREEN, "image": CYAN, "prompt": DIM}[k] + text + RESET)
            out.append("".join(pieces))
            out.append("")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render(color=False)

    def _repr_html_(self) -> str:
        style = {"train": "background:#c8f7c5", "image": "color:#06c;font-weight:bold", "prompt": "color:#666"}
        parts = [f"<p><i>note: {html.escape(n)}</i></p>" for n in self.notes]
        parts.append("<p>Green: supervised tokens (labels); grey: prompt; blue: image tokens.</p>")
        for s in self.samples:
            body = "".join(f'<span style="{style[k]}">{html.escape(t)}</span>' for k, t in self.runs(s))
            parts.append(f"<h4>{html.escape(self.stats(s))}</h4>"
                         f'<pre style="white-space:pre-wrap">{body}</pre>')
        return "\n".join(parts)


def inspect(recipe: Recipe, num: int = 3, index: int | None = None, split: str = "train") -> Inspection:
    """Format `num` samples (or the one at `index`, 0-based) of the recipe's data without loading weights.

    With data.cache on, the samples come from the split's prepared-data entry (prepared and stored first if
    there is none, as training would), so a second inspect, validate or training run formats nothing again;
    a dropped or refused row then shows its problem without its tokens."""
    _, family, formatter = formatting_for(recipe)
    d = recipe.data
    path = getattr(d, split)
    if not path:
        raise VlmtuneError(f"data.{split} is not set")
    views = _cached_views(recipe, split, family, formatter) if d.cache else _formatted_views(recipe, path, family,
                                                                                             formatter)
    samples = []
    for view in views:
        if index is not None and view.index != index:
            continue
        samples.append(view)
        if len(samples) >= (1 if index is not None else num):
            break
    if index is not None and not samples:
        raise VlmtuneError(f"--index {index}: {path} has no such row (it has fewer rows; rows count from 0)")
    return Inspection(samples, formatter.tokenizer, eos_notes(family, formatter))


def eos_notes(family, formatter) -> list[str]:
    """What inspect says when the formatter appends an EOS the chat template does not write."""
    if not (family.append_eos_after_reply and formatter.appends_eos(_PROBE)):
        return []
    return [f"the {family.name} chat template ends a reply without an end-of-sequence token, so vlmtune appends "
            f"{formatter.tokenizer.eos_token} to the supervised reply so the model learns to stop"]


def _formatted_views(recipe: Recipe, path: str, family, formatter):
    """Each row formatted as it is read (only as many as are shown)."""
    d = recipe.data
    rows = iter_rows(path, d.format, d.image_root, formatter, family, d.max_length, d.on_overlong,
                     read_options=reader_options(d), max_image_pixels=d.max_image_pixels)
    for r in rows:
        ex = r.example
        problem = str(r.problem.message) if r.problem is not None else None
        source = ex.source if ex else f"{r.problem.file}:{r.problem.row}"
        yield SampleView(r.row, source, ex.input_ids if ex else [], ex.labels if ex else [],
                         ex.media_tokens("image") if ex else 0, r.dropped, problem, ex.media if ex else [])


def _cached_views(recipe: Recipe, split: str, family, formatter) -> list[SampleView]:
    """Every row of the split from its prepared-data entry (the entry training uses), in file order."""
    others = {s: None for s in ("train", "eval") if s != split}  # prepare this split only
    data = check_data(dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **others)), family,
                      formatter)[0][split]
    views = [SampleView(0, e.source, e.input_ids, e.labels, e.media_tokens("image"), False, None, e.media)
             for e in data.examples]
    views += [SampleView(0, f"{p.file}:{p.row}", [], [], 0, dropped, str(p.message))
              for problems, dropped in ((data.problems, False), (data.dropped, True)) for p in problems]
    rank = {str(f): i for i, f in enumerate(data_files(getattr(recipe.data, split)))}  # a dataset's files in order

    def order(view: SampleView) -> tuple[int, int]:
        file, _, row = view.source.rpartition(":")
        return rank.get(file, 0), int(row) if row.isdigit() else 0

    views.sort(key=order)
    for i, view in enumerate(views):
        view.index = i
    return views


_PROBE = Conversation([Turn("user", [Part("text", text="Hi")]), Turn("assistant", [Part("text", text="Hello")])],
                      source="probe")
