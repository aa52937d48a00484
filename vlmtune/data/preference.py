"""Preference rows -> pairs of examples (DPO): one prompt rendered once by the family formatter, two replies.

Each side is the prompt followed by one reply, formatted as SFT formats a conversation, with two differences:
only that reply and its end-of-turn token carry labels (never an assistant turn of the prompt, never image
tokens, whatever data.train_on says), and each run between label changes is tokenized on its own, so both sides
hold exactly the same prompt tokens. The token budget counts the prompt and the longer reply; image tokens are
never cut (data.on_overlong drop / error / shrink_images as in SFT; shrinking gives both sides one pixel bound).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..families import Family
from .conversation import ConversationPair, TrainOn
from .formats import PAIR_FORMATS, RowProblem, read_rows, reader_options
from .formatting import IGNORE_INDEX, Formatter
from .images import DEFAULT_MAX_IMAGE_PIXELS, image_size
from .prepare import (
    Example,
    PreparedData,
    RowResult,
    _problem_at,
    _row,
    _with_max_pixels,
    format_example,
    prepare,
    video_clips,
)

SIDES = ("chosen", "rejected")


def is_pair_format(fmt: str) -> bool:
    """Whether `data.format` is a preference layout (rows become PreferencePairs, not Examples)."""
    return fmt in PAIR_FORMATS


@dataclass
class PreferencePair:
    """Two examples of one prompt: the same prompt tokens and media, then each reply and its end-of-turn token."""

    chosen: Example
    rejected: Example
    source: str  # file:row

    @property
    def prompt_length(self) -> int:
        """Tokens before the reply (the same in both)."""
        return prompt_length(self.chosen)

    @property
    def num_tokens(self) -> int:
        """What the token budget counts: the prompt and the longer reply."""
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))

    @property
    def images(self) -> list[str]:
        return self.chosen.images

    @property
    def videos(self) -> list:
        return self.chosen.videos

    @property
    def max_pixels(self) -> int | None:
        """The pixel bound both sides' images were shrunk to (None: not shrunk)."""
        return self.chosen.max_pixels


def prompt_length(example: Example) -> int:
    return next((i for i, x in enumerate(example.labels) if x != IGNORE_INDEX), len(example.labels))


@dataclass
class PairResult:
    """What became of one preference row: a pair (possibly dropped as too long) or a problem."""

    row: int
    example: PreferencePair | None = None  # named as RowResult's, so that `prepare.collect` sorts both
    problem: RowProblem | None = None
    dropped: bool = False
    fingerprint: str = ""
    shrink_bound: int | None = None


@dataclass
class PreparedPairs(PreparedData):
    """A preference split: its pairs, with the problems, drops and counts by file and row of SFT's PreparedData
    (whose `examples` stays empty)."""

    pairs: list[PreferencePair] = field(default_factory=list)
    noun = "pairs"

    def kept(self) -> list:
        return self.pairs

    @property
    def num_images(self) -> int:
        return sum(len(p.images) for p in self.pairs)

    def lengths(self) -> list[int]:
        """Each pair's budgeted length (prompt + the longer reply)."""
        return [p.num_tokens for p in self.pairs]

    def headline(self) -> str:
        prompt = sum(p.prompt_length for p in self.pairs)
        chosen = sum(p.chosen.num_supervised for p in self.pairs)
        rejected = sum(p.rejected.num_supervised for p in self.pairs)
        return (f"{self.rows} rows -> {len(self.pairs)} preference pairs, {self.num_images} images, {prompt} prompt "
                f"tokens, replies {chosen} chosen + {rejected} rejected tokens")


def pair_formatter(formatter: Formatter) -> Formatter:
    """The formatter as pairs use it: labels on the last reply only, the prompt tokenized on its own."""
    out = copy.copy(formatter)
    out.train_on = TrainOn.LAST_ASSISTANT
    out.split_at_labels = True
    return out


def iter_pairs(path: str | Path, fmt: str, image_root: str | None, formatter: Formatter, family: Family,
               max_length: int, on_overlong: str = "drop", read_options: dict | None = None,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, find_shrinkable: bool = False,
               sizes: dict | None = None) -> Iterator[PairResult]:
    """Each preference row read, checked and formatted (as `prepare.iter_rows` does for SFT rows)."""
    sizes = {} if sizes is None else sizes
    measure = partial(image_size, max_pixels=max_image_pixels)
    shrink = find_shrinkable or on_overlong == "shrink_images"
    formatter = pair_formatter(formatter)
    for index, item in enumerate(read_rows(Path(path), fmt, image_root, **(read_options or {}))):
        if isinstance(item, RowProblem):
            yield PairResult(index, problem=item)
            continue
        if not isinstance(item, ConversationPair):  # a LLaMA-Factory entry brings its own (SFT) layout
            yield PairResult(index, problem=_problem_at(item.source, f"this source holds conversations, not "
                                                        f"preference pairs (data.format {fmt} reads plain files)"))
            continue
        yield _pair(index, item, formatter, family, sizes, max_length, on_overlong, measure, shrink)


def prepare_pairs(recipe, family: Family, formatter: Formatter, split: str = "train", *,
                  check_images: str | None = None, find_shrinkable: bool = False,
                  sizes: dict | None = None) -> PreparedPairs:
    """One split of a recipe's preference data (`recipe.data`), every problem by file and row, images checked as
    `check_images` says (default data.check_images); `prepare.prepare` with pairs for rows."""
    d = recipe.data
    return prepare(getattr(d, split), d.format, d.image_root, formatter, family, d.max_length, d.on_overlong,
                   desc=f"checking {split} preference data", read_options=reader_options(d),
                   check_images=check_images or d.check_images, max_image_pixels=d.max_image_pixels,
                   find_shrinkable=find_shrinkable, sizes=sizes, rows=iter_pairs, out=PreparedPairs())


def _pair(index: int, item: ConversationPair, formatter: Formatter, family: Family, sizes: dict, max_length: int,
          on_overlong: str, measure, shrink: bool) -> PairResult:
    convs = {side: item.conversation(side) for side in SIDES}
    sides = {side: _row(index, conv, formatter, family, sizes, max_length, on_overlong, measure, shrink)
             for side, conv in convs.items()}
    broken = {side: r.problem for side, r in sides.items() if r.example is None}
    if broken:
        messages = list(dict.fromkeys(p.message for p in broken.values()))  # an image problem once, not twice
        named = messages if len(messages) == 1 else [f"{side}: {p.message}" for side, p in broken.items()]
        return PairResult(index, problem=_problem_at(item.source, "; ".join(named)))
    bound = _shared_bound(sides) if on_overlong == "shrink_images" else None
    examples = {side: _bounded(r.example, bound, convs[side], formatter, family, sizes) for side, r in sides.items()}
    too_long = [side for side, r in sides.items() if r.problem is not None]
    shrink_bound = _pair_bound(sides.values())
    if too_long:
        side = max(too_long, key=lambda s: len(examples[s].input_ids))
        problem = _problem_at(item.source, f"prompt + the longer reply ({side}): {sides[side].problem.message}")
        return PairResult(index, PreferencePair(examples["chosen"], examples["rejected"], item.source), problem,
                          dropped=on_overlong != "error", shrink_bound=shrink_bound)
    chosen, rejected = examples["chosen"], examples["rejected"]
    n = prompt_length(chosen)
    if (prompt_length(rejected) != n or chosen.input_ids[:n] != rejected.input_ids[:n] or chosen.media != rejected.media
            or chosen.grids != rejected.grids):
        return PairResult(index, problem=_problem_at(item.source, "the chat template renders the prompt differently "
                                                                  "before the two replies, so they cannot be compared"))
    fingerprint = hashlib.sha1(repr((chosen.input_ids, chosen.labels, rejected.input_ids, rejected.labels,
                                     chosen.images)).encode()).hexdigest()
    return PairResult(index, example=PreferencePair(chosen, rejected, item.source), fingerprint=fingerprint,
                      shrink_bound=shrink_bound)


def _shared_bound(sides: dict[str, RowResult]) -> int | None:
    """The pixel bound both sides take when shrink_images shrank either: the lower one (the longer reply's)."""
    bounds = [r.example.max_pixels for r in sides.values() if r.example.max_pixels is not None]
    return min(bounds) if bounds else None


def _pair_bound(results) -> int | None:
    """The bound that makes the pair fit: the lowest of the too-long sides', None if one of them cannot shrink."""
    needed = [r.shrink_bound for r in results if r.shrink_bound is not None or r.problem is not None]
    return min(needed) if needed and None not in needed else None


def _bounded(example: Example, bound: int | None, conv, formatter: Formatter, family: Family, sizes: dict) -> Example:
    """The example under the pair's pixel bound (formatted again when it has another one)."""
    if bound is None or example.max_pixels == bound:
        return example
    dims = [sizes[ref] for ref in conv.images]
    processor = _with_max_pixels(family, formatter.processor, bound)
    return format_example(conv, formatter, family, dims, processor, bound,
                          video_clips(family, formatter.processor, conv.videos, sizes))
