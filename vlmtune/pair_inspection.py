"""`vlmtune inspect` on preference data: each pair's prompt once, then both replies, each reply's labels highlighted
(chosen green, rejected red), image runs collapsed; the SFT view for every other data format."""

from __future__ import annotations

import html
from dataclasses import dataclass

from .config import Recipe
from .data.formats import reader_options
from .data.preference import PreferencePair, is_pair_format, iter_pairs
from .errors import VlmtuneError
from .inspection import CYAN, DIM, GREEN, RESET, Inspection, SampleView, eos_notes, inspect
from .preflight import formatting_for

RED = "\033[41;30m"
SIDES = {"chosen": GREEN, "rejected": RED}
HTML_SIDES = {"chosen": "background:#c8f7c5", "rejected": "background:#f7c5c5"}


def inspect_recipe(recipe: Recipe, num: int = 3, index: int | None = None, split: str = "train"):
    """`inspect` for any recipe: an Inspection of examples, or a PairInspection for a preference data.format."""
    from .methods import get as method_for

    if method_for(recipe.method).own_run:
        raise VlmtuneError(f"inspect shows formatted token sequences, which method {recipe.method} does not build "
                           f"(its model is no VLM); `vlmtune validate {recipe.source or 'RECIPE'}` checks its rows")
    if is_pair_format(recipe.data.format):
        return inspect_pairs(recipe, num, index, split)
    return inspect(recipe, num=num, index=index, split=split)


@dataclass
class PairView:
    index: int
    source: str
    pair: PreferencePair | None
    dropped: bool
    problem: str | None

    def side(self, name: str) -> SampleView:
        ex = getattr(self.pair, name)
        return SampleView(self.index, self.source, ex.input_ids, ex.labels, ex.media_tokens("image"), self.dropped,
                          self.problem, ex.media)

    def to_json(self) -> dict:
        sides = {name: self.side(name).to_json() if self.pair else None for name in SIDES}
        return {"index": self.index, "source": self.source, "dropped": self.dropped, "problem": self.problem,
                "prompt_length": self.pair.prompt_length if self.pair else 0, **sides}


@dataclass
class PairInspection:
    """Pairs of a recipe's preference data with the tokenizer to render them; HTML in Jupyter."""

    samples: list[PairView]
    tokenizer: object
    notes: list[str]

    def pieces(self, view: PairView):
        """(part, kind, text): part is 'prompt' (once) or a side's name; kind as `Inspection.runs` gives it."""
        tokens = Inspection([], self.tokenizer, [])
        n = view.pair.prompt_length
        prompt = view.side("chosen")
        cut = SampleView(view.index, view.source, prompt.input_ids[:n], prompt.labels[:n], 0, False, None,
                         prompt.media)
        yield from (("prompt", kind, text) for kind, text in tokens.runs(cut))
        for name in SIDES:
            yield from ((name, kind, text) for kind, text in tokens.runs(view.side(name), start=n))

    def stats(self, view: PairView) -> str:
        state = "DROPPED: " + (view.problem or "") if view.dropped else (view.problem or "kept")
        if view.pair is None:
            return f"#{view.index} {view.source}: {state}"
        p = view.pair
        return (f"#{view.index} {view.source}: prompt {p.prompt_length} tokens ({p.chosen.media_tokens('image')} "
                f"image tokens); supervised: chosen {p.chosen.num_supervised}, rejected {p.rejected.num_supervised}; "
                f"{state}")

    def parts(self, view: PairView, style) -> dict[str, str]:
        """The prompt and each side's reply, each piece wrapped by `style(part, kind, text)`."""
        out = {"prompt": "", **{name: "" for name in SIDES}}
        for part, kind, text in self.pieces(view):
            out[part] += style(part, kind, text)
        return out

    def render(self, color: bool = True) -> str:
        def style(part: str, kind: str, text: str) -> str:
            if not color:
                return f"[[{text}]]" if kind == "train" else text
            return (SIDES[part] if kind == "train" else CYAN if kind == "image" else DIM) + text + RESET

        out = [f"note: {n}" for n in self.notes]
        for view in self.samples:
            out.append((CYAN if color else "") + self.stats(view) + (RESET if color else ""))
            if view.pair is not None:
                parts = self.parts(view, style)
                out.append(parts["prompt"])
                out.extend(f"--- {name}:\n{parts[name]}" for name in SIDES)
            out.append("")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render(color=False)

    def _repr_html_(self) -> str:
        other = {"image": "color:#06c;font-weight:bold", "prompt": "color:#666"}

        def style(part: str, kind: str, text: str) -> str:
            css = HTML_SIDES[part] if kind == "train" else other[kind]
            return f'<span style="{css}">{html.escape(text)}</span>'

        out = [f"<p><i>note: {html.escape(n)}</i></p>" for n in self.notes]
        out.append("<p>Green: the chosen reply's labels; red: the rejected reply's; grey: the prompt (shared by "
                   "both); blue: image tokens.</p>")
        for view in self.samples:
            out.append(f"<h4>{html.escape(self.stats(view))}</h4>")
            if view.pair is not None:
                parts = self.parts(view, style)
                body = parts["prompt"] + "".join(f"<br><b>{name}:</b><br>{parts[name]}" for name in SIDES)
                out.append(f'<pre style="white-space:pre-wrap">{body}</pre>')
        return "\n".join(out)


def inspect_pairs(recipe: Recipe, num: int = 3, index: int | None = None, split: str = "train") -> PairInspection:
    """Format `num` pairs (or the one at `index`, 0-based) of the recipe's preference data without loading weights."""
    _, family, formatter = formatting_for(recipe)
    d = recipe.data
    path = getattr(d, split)
    if not path:
        raise VlmtuneError(f"data.{split} is not set")
    views = []
    for r in iter_pairs(path, d.format, d.image_root, formatter, family, d.max_length, d.on_overlong,
                        read_options=reader_options(d), max_image_pixels=d.max_image_pixels):
        if index is not None and r.row != index:
            continue
        source = r.example.source if r.example else f"{r.problem.file}:{r.problem.row}"
        views.append(PairView(r.row, source, r.example, r.dropped, r.problem.message if r.problem else None))
        if len(views) >= (1 if index is not None else num):
            break
    if index is not None and not views:
        raise VlmtuneError(f"--index {index}: {path} has no such row (it has fewer rows; rows count from 0)")
    return PairInspection(views, formatter.tokenizer, eos_notes(family, formatter))
