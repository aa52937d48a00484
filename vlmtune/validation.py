"""`vlmtune validate`: the whole dataset checked without a GPU, every problem by file and row, then a summary."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from .config import Recipe
from .data.preference import PreparedPairs
from .data.prepare import PreparedData
from .preflight import check_data, formatting_for


@dataclass
class ValidationReport:
    splits: dict[str, PreparedData | PreparedPairs]
    problems: list[str]  # stop training
    family: str
    on_overlong: str = "drop"

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self, limit: int = 200) -> str:
        lines = []
        for split, data in self.splits.items():
            warnings = [f"  warning: {p}" for p in [*data.warnings, *data.duplicates][:limit]]
            warnings += [f"  dropped: {p}" for p in data.dropped[:limit]]
            lines.append(f"{split}: {data.summary().splitlines()[0]}")
            lengths = pair_length_summary if isinstance(data, PreparedPairs) else length_summary
            lines.append("  " + lengths(data))
            lines.extend(image_lines(data, self.on_overlong, limit))
            lines.extend(warnings)
        if self.problems:
            lines.append(f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} would stop training:")
            lines.extend(f"  error: {p}" for p in self.problems[:limit])
            if len(self.problems) > limit:
                lines.append(f"  ... and {len(self.problems) - limit} more")
        else:
            lines.append("OK: no problem would stop training")
        return "\n".join(lines)


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


def length_summary(data: PreparedData) -> str:
    lengths = sorted(len(e.input_ids) for e in data.examples)
    tokens = sum(lengths)
    frac = data.num_supervised / tokens if tokens else 0.0
    p = {q: percentile(lengths, q) for q in (50, 90, 99)}
    return (f"tokens per sample p50 {p[50]}, p90 {p[90]}, p99 {p[99]}, max {lengths[-1] if lengths else 0}; "
            f"supervised fraction {frac:.1%}; dropped {len(data.dropped)}; duplicates {len(data.duplicates)}")


def pair_length_summary(data: PreparedPairs) -> str:
    lengths = sorted(data.lengths())
    p = {q: percentile(lengths, q) for q in (50, 90, 99)}
    return (f"tokens per pair (prompt + the longer reply) p50 {p[50]}, p90 {p[90]}, p99 {p[99]}, "
            f"max {lengths[-1] if lengths else 0}; dropped {len(data.dropped)}; duplicates {len(data.duplicates)}")


def image_lines(data: PreparedData | PreparedPairs, on_overlong: str, limit: int) -> list[str]:
    """How the images were checked, and which rows data.on_overlong=shrink_images shrinks (or would)."""
    lines = []
    if data.decoded:
        lines.append(f"  images: {_files(data.decoded)} decoded in full")
    if data.header_only:
        lines.append(f"  images: {_files(data.header_only)} only header-checked (their pixels are first decoded "
                     "during training); `validate --decode` or data.check_images=decode decodes them all now")
    if data.shrinkable:
        n = len(data.shrinkable)
        lines.append(f"  shrink_images shrinks the images of {n} rows to fit data.max_length:" if on_overlong ==
                     "shrink_images" else f"  data.on_overlong=shrink_images would keep {n} too-long rows by "
                     "shrinking their images:")
        lines.extend(f"    {p}" for p in data.shrinkable[:limit])
        if n > limit:
            lines.append(f"    ... and {n - limit} more")
    return lines


def _files(n: int) -> str:
    return f"{n} image file{'s' if n != 1 else ''}"


def validate(recipe: Recipe, decode_images: bool = False) -> ValidationReport:
    """Read, check and format every row of every split (no weights loaded); `decode_images` decodes every
    image in full, which also finds files whose header is fine but whose pixels are not. A method with its own
    run (a dual encoder's) checks its recipe's model and rows itself."""
    from .methods import get as method_for

    method = method_for(recipe.method)
    if method.own_run:
        return import_module(method.own_run).check(recipe, decode_images=decode_images)
    _, family, formatter = formatting_for(recipe)
    splits, problems = check_data(recipe, family, formatter, "decode" if decode_images else None,
                                  find_shrinkable=True)
    return ValidationReport(splits, problems, family.name, recipe.data.on_overlong)
