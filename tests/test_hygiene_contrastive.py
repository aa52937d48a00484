"""`vlmtune validate --near-duplicates / --clip-score / --write-clean` on a contrastive recipe: caption rows that
list several captions per image are read (not skipped), duplicate samples compare all the captions, and the CLIP
score of such a row is its worst caption's."""

from __future__ import annotations

import random

import numpy as np
import yaml

from vlmtune import hygiene
from vlmtune.cli import main

from . import test_hygiene, test_hygiene_clip
from .conftest import write_jsonl

pictures, aligned_clip = test_hygiene.pictures, test_hygiene_clip.aligned_clip  # the fixtures, shared


def _recipe(tmp_path, train, eval_=None):
    data = {"train": str(train), "format": "caption", **({"eval": str(eval_)} if eval_ else {})}
    doc = {"method": "contrastive", "model": {"name_or_path": "builtin:tiny-clip"}, "data": data,
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "recipe.yaml"


def test_near_duplicates_and_duplicate_samples_of_caption_lists(pictures, tmp_path, capsys):
    _, originals, copies = pictures
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"image": str(originals[0]), "caption": ["a busy picture", "colours and discs"]},
        {"image": str(originals[1]), "caption": ["another picture", "boxes"]},
        {"image": str(originals[2]), "caption": "a third picture"},
        {"image": str(copies[(0, "half")]), "caption": ["a busy picture", "colours and discs"]},  # repeats row 1
        {"image": str(originals[3]), "caption": ["a busy picture", "something else"]},  # same first caption only
    ])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", [
        {"image": str(copies[(1, "jpeg35")]), "caption": ["an eval caption"]},  # train row 2's image, re-encoded
        {"image": str(originals[4]), "caption": ["the last picture", "its second caption"]},
    ])
    report = hygiene.check(str(_recipe(tmp_path, train, eval_)), progress=False)
    near = report.near
    assert near.images == 7
    assert [g.images for g in near.groups] == [[str(originals[0]), str(copies[(0, "half")])],
                                              [str(originals[1]), str(copies[(1, "jpeg35")])]]
    assert [[r.where for r, _ in g.shown] for g in near.groups] == [[f"{train}:1", f"{train}:4"],
                                                                   [f"{train}:2", f"{eval_}:1"]]
    assert [(d.row.where, d.original.where) for d in near.duplicates] == [(f"{train}:4", f"{train}:1")]

    clean = tmp_path / "train.clean.jsonl"
    assert main(["validate", str(tmp_path / "recipe.yaml"), "--near-duplicates", "--write-clean", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "train: 5 image-caption pairs, 9 captions" in out and "OK: no problem would stop training" in out
    assert "2 groups of near-duplicates, 1 duplicate sample" in out
    assert "1 groups hold both train and eval rows" in out and "4 of 5 rows" in out
    lines = train.read_text().splitlines()
    assert clean.read_text().splitlines() == lines[:3] + lines[4:]


def test_the_clip_score_of_a_caption_list_is_its_worst_caption(aligned_clip, tmp_path, capsys):
    colours = list(test_hygiene_clip.COLOURS)
    rng = random.Random(3)
    (tmp_path / "images").mkdir()
    rows = []
    for n, colour in enumerate(colours * 3, start=1):
        path = tmp_path / "images" / f"{n:02d}.png"
        test_hygiene_clip._shape(colour, rng).save(path)
        rows.append({"image": f"images/{n:02d}.png", "caption": [f"a {colour} shape"] * 2})
    wrong = {4: "red", 11: "green"}  # rows whose second caption names another colour (their first is right)
    for n, other in wrong.items():
        rows[n - 1]["caption"][1] = f"a {other} shape"
        assert rows[n - 1]["caption"][0] != rows[n - 1]["caption"][1]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = _recipe(tmp_path, train)
    clip = hygiene.check(str(recipe), near_duplicates=False, clip_model=str(aligned_clip), progress=False).clip
    assert len(clip.scores) == 18 and not clip.unscored
    assert {clip.rows[i].row for i in np.argsort(clip.scores)[:2]} == set(wrong)
    row4 = next(r for r in clip.rows if r.row == 4)
    assert row4.texts == ("a yellow shape", "a red shape") and row4.text == "a yellow shape | a red shape"

    code = main(["validate", str(recipe), "--clip-score", str(aligned_clip), "--clip-quantile", "0.1",
                 "--write-clean", str(tmp_path / "clean.jsonl")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "18 rows scored" in out and "2 rows below" in out and all(f"train.jsonl:{n}:" in out for n in wrong)
    lines = train.read_text().splitlines()
    assert (tmp_path / "clean.jsonl").read_text().splitlines() == [
        line for n, line in enumerate(lines, start=1) if n not in wrong]


def test_a_single_caption_file_reads_as_before(pictures, tmp_path):
    from vlmtune.config import load_recipe

    _, originals, _ = pictures
    train = write_jsonl(tmp_path / "train.jsonl", [{"image": str(p), "caption": f"picture {i}"}
                                                   for i, p in enumerate(originals[:3])])
    rows = hygiene.recipe_rows(load_recipe(str(_recipe(tmp_path, train))))["train"]
    assert [(r.row, r.images, r.text, r.texts) for r in rows] == [
        (i + 1, (str(originals[i]),), f"picture {i}", (f"picture {i}",)) for i in range(3)]
