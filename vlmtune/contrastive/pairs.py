"""Image-caption pairs for contrastive training: `caption` rows (and `data.columns`), one image each, one or more
captions (a list under the caption column). Training samples one caption per image each epoch; evaluation uses
them all."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import VlmtuneError

FORMAT = "caption"


@dataclass(frozen=True)
class Pair:
    image: str
    captions: tuple[str, ...]
    source: str  # file:row


def read_pairs(path, data) -> list[Pair]:
    """Every row of `path` as a Pair, read as `vlmtune eval` reads caption rows; VlmtuneError naming the rows that
    have no single image. `data`: the recipe's data section, or a saved recipe.yaml's data mapping."""
    from types import SimpleNamespace

    from ..data.formats import reader_options
    from ..evaluation.rows import read_eval_rows

    if isinstance(data, dict):
        data = SimpleNamespace(**{"format": FORMAT, "image_root": None, **data})

    if data.format != FORMAT:
        raise VlmtuneError(f"data.format: contrastive training reads image-caption rows (format: {FORMAT}, with "
                           f"data.columns mapping image and caption to your columns), not {data.format!r}")
    rows = read_eval_rows(path, FORMAT, reader_options(data), data.image_root)
    pairs, bad = [], []
    for row in rows.rows:
        images = [img for turn in row.prompt.turns for img in turn.images]
        if len(images) != 1:
            bad.append(f"{row.source}: {len(images)} images; a contrastive pair has exactly one")
            continue
        pairs.append(Pair(images[0], tuple(row.references), row.source))
    if bad:
        raise VlmtuneError(f"{len(bad)} row(s) of {path} cannot be used:\n" + "\n".join(f"  - {b}" for b in bad[:20]))
    if rows.skipped:
        raise VlmtuneError(f"{len(rows.skipped)} row(s) of {path} have no caption, e.g. {rows.skipped[0]}: give "
                           "each row a non-empty caption or remove it")
    return pairs


class PairDataset:
    """A torch-style dataset of (image path, one caption): caption k of an image is drawn from (seed, epoch, index),
    so every epoch may see another caption and a rerun sees the same ones."""

    def __init__(self, pairs: list[Pair], seed: int = 0):
        self.pairs, self.seed, self.epoch = pairs, seed, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        caption = random.Random(f"{self.seed}-{self.epoch}-{i}").choice(pair.captions)
        return {"image": pair.image, "caption": caption}


def make_shape_captions(out_dir, n_train: int = 48, n_eval: int = 12, seed: int = 0, size: int = 32) -> Path:
    """A synthetic pair set: one coloured shape per image, three captions each (images/, train.jsonl, eval.jsonl)."""
    import json

    from ..demo.shapes import COLOURS, SHAPES, draw_scene

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    kinds = [(s, c) for s in SHAPES for c in COLOURS]
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            shape, colour = kinds[i % len(kinds)]
            s = rng.randint(size // 2, size - 4)
            x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
            name = f"images/{split}_{i:04d}.png"
            draw_scene([{"shape": shape, "colour": colour, "box": [x0, y0, x0 + s, y0 + s]}], size).save(out / name)
            rows.append({"image": name, "caption": [f"a {colour} {shape}", f"a picture of a {colour} {shape}",
                                                    f"the {shape} is {colour}"]})
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / f"{split}.jsonl")
    return out
