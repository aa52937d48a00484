"""`vlmtune validate --clip-score`: a tiny CLIP trained here to match colours flags rows whose captions were swapped."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from vlmtune import hygiene
from vlmtune.cli import main

from .conftest import write_jsonl

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20),
           "purple": (140, 50, 170), "orange": (245, 130, 20)}


def _shape(colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    s = rng.randint(30, 50)
    x, y = rng.randint(0, size - s), rng.randint(0, size - s)
    kind = rng.choice(["circle", "square", "triangle"])
    fill = COLOURS[colour]
    if kind == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=fill)
    elif kind == "square":
        draw.rectangle([x, y, x + s, y + s], fill=fill)
    else:
        draw.polygon([(x + s / 2, y), (x + s, y + s), (x, y + s)], fill=fill)
    return img


def _caption(colour: str) -> str:
    return f"a {colour} shape"


@pytest.fixture(scope="session")
def aligned_clip(tmp_path_factory):
    """The tiny CLIP (vlmtune.embedding's builtin) trained for 100 steps to tell the six colours apart: each step
    24 shapes, four of each colour, classified against the six captions through CLIPModel's own towers."""
    from vlmtune.embedding import load_embedding_model
    from vlmtune.embedding.encode import image_features, image_inputs, text_features, text_inputs

    folder = tmp_path_factory.mktemp("aligned-clip")
    model, processor, family = load_embedding_model("builtin:tiny-clip")  # built once per session, shared
    model.train()
    rng = random.Random(0)
    torch.manual_seed(0)
    texts = text_inputs(processor, family, [_caption(c) for c in COLOURS])
    bank = [image_inputs(processor, [_shape(c, rng) for c in COLOURS for _ in range(4)])["pixel_values"]
            for _ in range(8)]
    labels = torch.arange(len(COLOURS)).repeat_interleave(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(100):
        logits = model.logit_scale.exp() * image_features(model, bank[step % 8]) @ text_features(model, **texts).T
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, loss.item()
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def captioned(tmp_path):
    """24 caption rows (four shapes of each colour) whose lines 3 and 9 (red <-> green) and 13 and 21 (blue <->
    orange) have swapped captions, and a recipe over them."""
    rng = random.Random(7)
    (tmp_path / "images").mkdir()
    colours = [c for c in COLOURS for _ in range(4)]
    rng.shuffle(colours)
    colours[2], colours[8], colours[12], colours[20] = "red", "green", "blue", "orange"
    rows = []
    for n, colour in enumerate(colours, start=1):
        path = tmp_path / "images" / f"{n:02d}.png"
        _shape(colour, rng).save(path)
        rows.append({"image": f"images/{n:02d}.png", "caption": _caption(colour)})
    for a, b in ((2, 8), (12, 20)):
        rows[a]["caption"], rows[b]["caption"] = rows[b]["caption"], rows[a]["caption"]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    doc = {"model": {"name_or_path": "builtin:tiny-qwen2-vl"}, "data": {"train": str(data), "format": "caption"},
           "output_dir": str(tmp_path / "out")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "recipe.yaml", data, {3, 9, 13, 21}


def test_the_clip_score_flags_the_swapped_captions(aligned_clip, captioned):
    recipe, _, swapped = captioned
    report = hygiene.check(str(recipe), near_duplicates=False, clip_model=str(aligned_clip), progress=False)
    clip = report.clip
    assert len(clip.scores) == 24 and not clip.unscored
    lowest = {clip.rows[i].row for i in np.argsort(clip.scores)[:4]}
    assert lowest == swapped
    fence = {row.row for row, _ in clip.below()}  # the default cut: Tukey's lower fence
    assert fence >= swapped and len(fence) <= 5, fence
    assert all(r.text.startswith("a ") and "Describe" not in r.text for r in clip.rows)  # the caption alone
    random_clip = hygiene.check(str(recipe), near_duplicates=False, clip_model="builtin:tiny-clip", progress=False)
    assert {random_clip.clip.rows[i].row for i in np.argsort(random_clip.clip.scores)[:4]} != swapped


def test_validate_clip_score_prints_the_distribution_and_writes_the_rest(aligned_clip, captioned, capsys):
    recipe, data, swapped = captioned
    clean = data.with_name("clean.jsonl")
    code = main(["validate", str(recipe), "--clip-score", str(aligned_clip), "--clip-quantile", "0.17",
                 "--write-clean", str(clean)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "24 rows scored" in out and "median" in out and "<- threshold" in out
    assert "4 rows below" in out and all(f"train.jsonl:{n}:" in out for n in swapped)
    assert "20 of 24 rows" in out and "4 dropped: 4 low CLIP scores" in out
    lines = data.read_text().splitlines()
    assert clean.read_text().splitlines() == [line for n, line in enumerate(lines, start=1) if n not in swapped]
    assert main(["validate", str(recipe), "--clip-score", str(aligned_clip), "--clip-threshold", "2"]) == 0
    assert "24 rows below +2.000 (threshold 2)" in capsys.readouterr().out
