"""Data file -> training examples, once, before training: read, check images, count tokens, format, budget."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..families import Family
from .conversation import Conversation
from .formats import RowProblem, read_rows
from .formatting import IGNORE_INDEX, FormatError, Formatter
from .images import ImageProblem, image_size


@dataclass
class Example:
    """One training sample: token ids and labels, plus what the image processor needs later."""

    input_ids: list[int]
    labels: list[int]
    images: list[str]
    grids: list[tuple[int, ...]]
    source: str


@dataclass
class PreparedData:
    examples: list[Example] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)  # rows that stop training
    dropped: list[RowProblem] = field(default_factory=list)  # rows left out (too long)
    rows: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_supervised(self) -> int:
        return sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in self.examples)

    @property
    def num_images(self) -> int:
        return sum(len(e.images) for e in self.examples)

    def summary(self) -> str:
        tokens = self.num_tokens
        frac = self.num_supervised / tokens if tokens else 0.0
        lines = [f"{self.rows} rows -> {len(self.examples)} examples, {self.num_images} images, "
                 f"{tokens} tokens ({frac:.1%} supervised)"]
        if self.dropped:
            lines.append(f"{len(self.dropped)} rows dropped because they do not fit data.max_length "
                         f"(image tokens are never cut); first: {self.dropped[0]}")
        return "\n".join(lines)


def prepare(path: str | Path, fmt: str, image_root: str | None, formatter: Formatter, family: Family,
            max_length: int, on_overlong: str = "drop", desc: str = "preparing data") -> PreparedData:
    """Read and format a whole data file; problems are collected with file and row, never raised one by one."""
    path = Path(path)
    out = PreparedData()
    sizes: dict[str, tuple[int, int] | ImageProblem] = {}
    for item in tqdm(read_rows(path, fmt, image_root), desc=desc, unit=" rows", leave=False):
        out.rows += 1
        if isinstance(item, RowProblem):
            out.problems.append(item)
            continue
        example = _example(item, formatter, family, sizes, out)
        if example is None:
            continue
        if len(example.input_ids) > max_length:
            n_img = sum(1 for x in example.input_ids if x == formatter.image_token_id)
            problem = _problem(item, f"{len(example.input_ids)} tokens ({n_img} image tokens) do not fit "
                                     f"data.max_length={max_length}; raise max_length, lower data.max_pixels, "
                                     "or shorten the sample")
            (out.problems if on_overlong == "error" else out.dropped).append(problem)
            continue
        out.examples.append(example)
    return out


def _example(conv: Conversation, formatter: Formatter, family: Family, sizes: dict,
             out: PreparedData) -> Example | None:
    counts, grids = [], []
    for ref in conv.images:
        if ref not in sizes:
            try:
                sizes[ref] = image_size(Path(ref))
            except ImageProblem as e:
                sizes[ref] = e
        size = sizes[ref]
        if isinstance(size, ImageProblem):
            out.problems.append(_problem(conv, str(size)))
            return None
        width, height = size
        try:
            n, grid = family.image_layout(formatter.processor, height, width)
        except ValueError as e:  # e.g. an extreme aspect ratio the processor refuses
            out.problems.append(_problem(conv, f"image {ref} ({width}x{height}) cannot be processed: {e}"))
            return None
        counts.append(n)
        grids.append(grid)
    try:
        formatted = formatter(conv, counts)
    except FormatError as e:
        out.problems.append(_problem(conv, str(e).removeprefix(f"{conv.source}: ")))
        return None
    if not any(x != IGNORE_INDEX for x in formatted.labels):
        out.problems.append(_problem(conv, "no token is supervised (every reply has train: false?)"))
        return None
    return Example(formatted.input_ids, formatted.labels, conv.images, grids, conv.source)


def _problem(conv: Conversation, message: str) -> RowProblem:
    file, _, row = conv.source.rpartition(":")
    return RowProblem(file, int(row) if row.isdigit() else 0, message)


def problem_counts(problems: list[RowProblem]) -> Counter:
    return Counter(p.message.split(":")[0] for p in problems)
