"""Data hygiene (`vlmtune validate --near-duplicates / --clip-score / --write-clean`), the same from Python:

    from vlmtune import hygiene
    report = hygiene.check("recipe.yaml", near_duplicates=True, clip_model="openai/clip-vit-base-patch32")
    print(report.render())
    report.write_clean("train.clean.jsonl")       # the train file without the flagged rows
"""

from __future__ import annotations

import os

from ..errors import VlmtuneError
from .clip_score import ClipScores, score_rows
from .duplicates import DEFAULT_DISTANCE, MAX_DISTANCE, NearDuplicates, find_near_duplicates
from .report import CleanResult, HygieneReport
from .rows import SampleRow, recipe_rows

__all__ = ["DEFAULT_DISTANCE", "CleanResult", "ClipScores", "HygieneReport", "NearDuplicates", "SampleRow", "check",
           "find_near_duplicates", "recipe_rows", "score_rows"]


def check(recipe, near_duplicates: bool = True, distance: int | None = None, clip_model: str | None = None,
          clip_threshold: float | None = None, clip_quantile: float | None = None,
          drop_near_duplicate_images: bool = False, progress: bool = True) -> HygieneReport:
    """Near-duplicate images and duplicate samples (`distance`: default data.near_duplicate_distance, else
    DEFAULT_DISTANCE) and/or the CLIP score of every row under `clip_model`, over all of the recipe's splits.
    `recipe`: a Recipe or the path of a recipe file."""
    from ..config import load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    rows = recipe_rows(recipe)
    every = [r for split in rows.values() for r in split]
    report = HygieneReport(rows, drop_near_duplicate_images=drop_near_duplicate_images)
    if near_duplicates:
        if distance is None:
            distance = getattr(recipe.data, "near_duplicate_distance", None)
        distance = DEFAULT_DISTANCE if distance is None else distance
        if not 0 <= distance <= MAX_DISTANCE:
            raise VlmtuneError(f"--hash-distance (data.near_duplicate_distance) must be in [0, {MAX_DISTANCE}] bits "
                               f"of 64, got {distance}; {DEFAULT_DISTANCE} finds resized, re-encoded and slightly "
                               "cropped copies")
        report.near = find_near_duplicates(every, distance, progress=progress)
    if clip_model:
        report.clip = score_rows(every, clip_model, clip_threshold, clip_quantile, progress=progress)
    return report
