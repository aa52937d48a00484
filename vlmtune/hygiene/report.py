"""What the hygiene checks found, the rows they flag for removal, and the report `vlmtune validate` prints."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .clean import write_clean
from .clip_score import ClipScores
from .duplicates import NearDuplicates
from .rows import SampleRow, data_path


@dataclass
class CleanResult:
    source: Path
    out: Path
    rows: int  # rows read in the split
    dropped: int
    reasons: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        why = "; ".join(_n(n, reason) for reason, n in self.reasons.most_common()) or "nothing was flagged"
        moved = "" if self.out.resolve().parent == self.source.resolve().parent else \
            f"; relative image paths in it resolve against {_short(str(self.out.parent))}: keep it beside the input " \
            "or set data.image_root"
        return f"wrote {_short(str(self.out))}: {self.rows - self.dropped} of {self.rows} rows of " \
               f"{_short(str(self.source))} ({self.dropped} dropped: {why}){moved}"


@dataclass
class HygieneReport:
    rows: dict[str, list[SampleRow]]  # split -> its readable rows
    near: NearDuplicates | None = None
    clip: ClipScores | None = None
    drop_near_duplicate_images: bool = False  # also flag rows that show a copy of an earlier row's image

    def flagged(self) -> dict[SampleRow, tuple[str, str]]:
        """Row -> (reason, detail) for every row `write_clean` leaves out; the first reason found wins."""
        out: dict[SampleRow, tuple[str, str]] = {}
        if self.near is not None:
            for dup in self.near.duplicates:
                out.setdefault(dup.row, ("duplicate sample", f"repeats {dup.original.where}"))
            if self.drop_near_duplicate_images:
                for row, first in self.near.copy_rows().items():
                    out.setdefault(row, ("near-duplicate image", f"copies the image of {first.where}"))
        if self.clip is not None:
            for row, score in self.clip.below():
                out.setdefault(row, ("low CLIP score", f"{score:.3f} < {self.clip.threshold:.3f}"))
        return out

    def write_clean(self, out: str | Path, split: str = "train", overwrite: bool = False,
                    recipe=None) -> CleanResult:
        """Write `split`'s data file without its flagged rows to `out` (same container; never over the input)."""
        rows = self.rows.get(split, [])
        if recipe is not None:
            source = data_path(recipe, split)
        elif rows:
            source = Path(rows[0].file)
        else:
            raise ValueError(f"no {split} rows were read: pass the recipe to name the {split} data file")
        flagged = {r: why for r, why in self.flagged().items() if r.split == split}
        dropped = write_clean(source, {r.row for r in flagged}, out, overwrite=overwrite)
        return CleanResult(source, Path(out), len(rows), dropped, Counter(reason for reason, _ in flagged.values()))

    def render(self, limit: int = 50) -> str:
        lines = []
        if self.near is not None:
            lines.extend(_near_lines(self.near, limit))
        if self.clip is not None:
            lines.extend(_clip_lines(self.clip, limit))
        flagged = self.flagged()
        if flagged:
            per_split = Counter(r.split for r in flagged)
            lines.append("flagged for --write-clean: " + ", ".join(_n(n, f"{s} row") for s, n in per_split.items()))
        return "\n".join(lines)


def _near_lines(near: NearDuplicates, limit: int) -> list[str]:
    lines = [f"near-duplicate images (pHash, Hamming distance <= {near.distance} of 64): {_n(near.images, 'image')}, "
             f"{_n(len(near.groups), 'group')} of near-duplicates, {_n(len(near.duplicates), 'duplicate sample')}"]
    for n, group in enumerate(near.groups[:limit], start=1):
        lines.append(f"  group {n}: {len(group.images)} images, up to {group.max_distance} bits apart")
        for row, image in group.shown[:limit]:
            mark = "" if image == group.images[0] else " (copy)"
            lines.append(f"    {_short(row.where)}: {_short(image)}{mark}")
        if len(group.shown) > limit:
            lines.append(f"    ... and {len(group.shown) - limit} more rows")
    if len(near.groups) > limit:
        lines.append(f"  ... and {len(near.groups) - limit} more groups")
    leaks = [g for g in near.groups if {r.split for r, _ in g.shown} >= {"train", "eval"}]
    if leaks:
        lines.append(f"  {len(leaks)} groups hold both train and eval rows: those eval rows test on training images")
    for dup in near.duplicates[:limit]:
        lines.append(f"  duplicate sample: {_short(dup.row.where)} repeats {_short(dup.original.where)} (same images "
                     "up to near-duplicates, same text)")
    if len(near.duplicates) > limit:
        lines.append(f"  ... and {len(near.duplicates) - limit} more duplicate samples")
    for path, why in list(near.unhashed.items())[:limit]:
        lines.append(f"  not hashed: {path}: {why}")
    return lines


def _clip_lines(clip: ClipScores, limit: int) -> list[str]:
    not_scored = f", {len(clip.unscored)} not scored ({_reasons(clip.unscored)})" if clip.unscored else ""
    lines = [f"CLIP score (cosine of image and text) under {clip.model}: {len(clip.scores)} rows scored{not_scored}"]
    if len(clip.scores):
        q = clip.quantiles()
        lines.append("  " + "  ".join(f"{_qname(k)} {v:+.3f}" for k, v in q.items()))
        lines.extend(clip.histogram())
    below = clip.below()
    lines.append(f"  {len(below)} rows below {clip.threshold:+.3f} ({clip.rule}):")
    for row, score in below[:limit]:
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        lines.append(f"    {_short(row.where)}: {score:+.3f} {text!r}")
    if len(below) > limit:
        lines.append(f"    ... and {len(below) - limit} more")
    return lines


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _short(path: str) -> str:
    """A path under the working folder relative to it (reports stay readable), any other path as it is."""
    try:
        return os.path.relpath(path) if os.path.abspath(path).startswith(os.getcwd() + os.sep) else path
    except ValueError:
        return path


def _qname(q: float) -> str:
    return {0.0: "min", 0.5: "median", 1.0: "max"}.get(q, f"p{q * 100:g}")


def _reasons(unscored) -> str:
    return ", ".join(f"{n} {why}" for why, n in Counter(why for _, why in unscored).most_common())
