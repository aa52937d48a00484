"""`vlmtune validate`'s hygiene options: their arguments, and the run after the usual checks."""

from __future__ import annotations

import sys

from ..errors import VlmtuneError
from .duplicates import DEFAULT_DISTANCE


def add_arguments(p) -> None:
    g = p.add_argument_group("data hygiene")
    g.add_argument("--near-duplicates", action="store_true",
                   help="group near-duplicate images (perceptual hash) and report rows repeating image and text")
    g.add_argument("--hash-distance", type=int, metavar="N",
                   help=f"Hamming distance (of 64 bits) for near-duplicates (default data.near_duplicate_distance, "
                        f"else {DEFAULT_DISTANCE})")
    g.add_argument("--clip-score", metavar="MODEL",
                   help="score each row's image against its text under a CLIP/SigLIP model (folder, hub id, "
                        "builtin:tiny-clip or contrastive adapter)")
    g.add_argument("--clip-threshold", type=float, help="flag rows scoring below this cosine (default: Tukey's "
                                                        "lower fence of the scores)")
    g.add_argument("--clip-quantile", type=float, help="flag the lowest fraction of rows instead, e.g. 0.05")
    g.add_argument("--drop-near-duplicate-images", action="store_true",
                   help="--write-clean also drops rows showing a copy of an earlier row's image (default: only "
                        "duplicate samples and low CLIP scores)")
    g.add_argument("--write-clean", action="append", default=[], metavar="[SPLIT=]FILE",
                   help="write the train (or SPLIT=eval) data file without the flagged rows, in its own format")
    g.add_argument("--overwrite", action="store_true", help="let --write-clean replace an existing file "
                                                            "(never the input)")


def wanted(args) -> bool:
    return bool(args.near_duplicates or args.clip_score or args.write_clean)


def _targets(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for value in values:
        split, sep, file = value.partition("=")
        if sep and split in ("train", "eval"):
            out.append((split, file))
        else:
            out.append(("train", value))
    return out


def run(args, recipe) -> None:
    """The checks asked for, their report on stdout, and the cleaned files."""
    from . import check

    targets = _targets(args.write_clean)
    near = args.near_duplicates or args.hash_distance is not None
    if targets and not (near or args.clip_score):
        raise VlmtuneError("--write-clean leaves out the rows the checks flag: add --near-duplicates and/or "
                           "--clip-score MODEL")
    report = check(recipe, near_duplicates=near, distance=args.hash_distance, clip_model=args.clip_score,
                   clip_threshold=args.clip_threshold, clip_quantile=args.clip_quantile,
                   drop_near_duplicate_images=args.drop_near_duplicate_images, progress=sys.stderr.isatty())
    print(report.render())
    for split, file in targets:
        print(report.write_clean(file, split, overwrite=args.overwrite, recipe=recipe).summary())
