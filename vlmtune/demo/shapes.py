"""The synthetic shapes dataset: coloured shapes with questions about colour, shape, count and position."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20)}
SYSTEM_PROMPT = "You answer questions about pictures of coloured shapes in one short sentence."


def _qa_colour(shape: str, colour: str) -> tuple[str, str]:
    return f"What colour is the {shape}?", f"The {shape} is {colour}."


def _qa_shape(colour: str, shape: str) -> tuple[str, str]:
    return f"Which shape is {colour}?", f"The {colour} shape is a {shape}."


def _qa_count(n: int) -> tuple[str, str]:
    return "How many shapes are there?", ("There is 1 shape." if n == 1 else f"There are {n} shapes.")


def _qa_side(side: str, shape: str) -> tuple[str, str]:
    return f"Which shape is on the {side}?", f"The {shape} is on the {side}."


def _qa_total(n: int) -> tuple[str, str]:
    return "How many shapes are in the two pictures together?", f"There are {n} shapes in total."


def _scene(rng: random.Random, size: int) -> list[dict]:
    """1-3 shapes with distinct kinds and colours, ordered left to right, one per column."""
    n = rng.randint(1, 3)
    kinds, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    col_w = size / 3
    cols = sorted(rng.sample(range(3), n))
    scene = []
    for kind, colour, col in zip(kinds, colours, cols, strict=True):
        s = rng.randint(int(size * 0.18), int(size * 0.26))
        x0 = int(col * col_w + (col_w - s) / 2)
        y0 = rng.randint(int(size * 0.1), int(size * 0.9) - s)
        scene.append({"shape": kind, "colour": colour, "box": [x0, y0, x0 + s, y0 + s]})
    return scene


def draw_scene(scene: list[dict], size: int):
    """Render a scene as a palette PIL image (white background)."""
    from PIL import Image, ImageDraw

    img = Image.new("P", (size, size), 0)
    img.putpalette([255, 255, 255] + [v for rgb in COLOURS.values() for v in rgb])
    draw = ImageDraw.Draw(img)
    for obj in scene:
        fill = 1 + list(COLOURS).index(obj["colour"])
        x0, y0, x1, y1 = obj["box"]
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _questions(rng: random.Random, scene: list[dict]) -> list[tuple[str, str]]:
    obj = rng.choice(scene)
    pool = [
        _qa_colour(obj["shape"], obj["colour"]),
        _qa_shape(obj["colour"], obj["shape"]),
        _qa_count(len(scene)),
    ]
    if len(scene) > 1:
        pool += [_qa_side("left", scene[0]["shape"]), _qa_side("right", scene[-1]["shape"])]
    return rng.sample(pool, 2)


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _shapes_row(rng: random.Random, split: str, idx: int, out: Path, size: int) -> dict:
    kind = rng.choices(["single", "multi", "system", "two"], weights=[70, 18, 6, 6])[0]
    names = [f"{split}_{idx:04d}.png"] + ([f"{split}_{idx:04d}_b.png"] if kind == "two" else [])
    scenes = [_scene(rng, size) for _ in names]
    for name, scene in zip(names, scenes, strict=True):
        draw_scene(scene, size).save(out / "images" / name, optimize=True)
    images = [{"type": "image", "image": f"images/{name}"} for name in names]
    if kind == "two":
        pairs = [_qa_total(sum(len(s) for s in scenes))]
    else:
        pairs = _questions(rng, scenes[0])[: 2 if kind == "multi" else 1]
    messages = [{"role": "system", "content": [_text(SYSTEM_PROMPT)]}] if kind in ("system", "two") else []
    for turn, (q, a) in enumerate(pairs):
        messages.append({"role": "user", "content": (images if turn == 0 else []) + [_text(q)]})
        messages.append({"role": "assistant", "content": [_text(a)]})
    return {"messages": messages}


def make_shapes_dataset(
    out_dir: str | os.PathLike, n_train: int = 256, n_eval: int = 32, seed: int = 0, size: int = 56
) -> Path:
    """Write images/ + train.jsonl + eval.jsonl of templated shape questions (deterministic given seed)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("eval", n_eval, 1)):
        for old in (out / "images").glob(f"{split}_*.png"):
            old.unlink()
        rng = random.Random(seed * 1000 + offset)
        rows = [_shapes_row(rng, split, i, out, size) for i in range(1, n + 1)]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return out
