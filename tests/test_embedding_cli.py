"""The dual-encoder commands end to end on the tiny CLIP: contrastive train, recall, merge, index build, search."""

from __future__ import annotations

import json

import pytest

from tests.test_contrastive_method import tiny_clip_recipe
from vlmtune.cli import main
from vlmtune.contrastive.pairs import make_shape_captions


@pytest.mark.slow
def test_train_recall_merge_index_search(tmp_path, capsys):
    data = make_shape_captions(tmp_path / "data", n_train=24, n_eval=6)
    recipe = tiny_clip_recipe(tmp_path, data, lora="{r: 4, alpha: 8, towers: vision}", steps=4)
    assert main(["contrastive", "train", str(recipe), "train.learning_rate=1e-3"]) == 0
    assert "recall@1 image->text" in capsys.readouterr().out
    assert main(["contrastive", "train", str(recipe)]) == 2  # the folder holds a run: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["contrastive", "recall", str(tmp_path / "run"), "--json"]) == 0
    side = json.loads(capsys.readouterr().out)
    assert set(side) == {"base", "adapter"} and "t2i_r@10" in side["adapter"]
    assert main(["contrastive", "merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "merged"), "--data", str(data / "eval.jsonl")]) == 0  # beside its base
    rows = {line.split()[0]: [float(v) for v in line.split()[1:3]] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["t2i_r@10"] == pytest.approx([side["base"]["t2i_r@10"], side["adapter"]["t2i_r@10"]], abs=1e-3)
    assert rows["i2t_r@1"] == pytest.approx([side["base"]["i2t_r@1"], side["adapter"]["i2t_r@1"]], abs=1e-3)
    assert main(["index", "build", "--model", str(tmp_path / "merged"), "--images", str(data / "eval.jsonl"),
                 "--out", str(tmp_path / "ix"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(tmp_path / "ix"), "a red circle", "-k", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 3 and all(h["path"].startswith(str(data / "images")) for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
