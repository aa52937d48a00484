"""`method: contrastive` through the method registry: `vlmtune train`, `vlmtune validate` and `vlmtune eval` on a
tiny CLIP recipe, as for the VLM methods (vlmtune contrastive train stays a spelling of vlmtune train)."""

from __future__ import annotations

import json

import pytest

from vlmtune import methods
from vlmtune.cli import main
from vlmtune.contrastive.pairs import make_shape_captions
from vlmtune.methods.contrastive import ContrastiveConfig


def tiny_clip_recipe(tmp_path, data, lora: str, steps: int, extra: str = ""):
    """A recipe file training the tiny CLIP on shape captions (make_shape_captions) for a few steps."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""method: contrastive
model: {{name_or_path: "builtin:tiny-clip"}}
lora: {lora}
{extra}data: {{train: {data}/train.jsonl, eval: {data}/eval.jsonl, format: caption}}
train: {{max_steps: {steps}, per_device_train_batch_size: 6, gradient_accumulation_steps: 1, learning_rate: 1e-3,
         logging_steps: 1, report_to: [none]}}
output_dir: {tmp_path}/run
""")
    return recipe


def test_the_registry_holds_contrastive_with_its_own_run():
    method = methods.get("contrastive")
    assert method.section is ContrastiveConfig and method.own_run and not method.uses_vision_cache
    assert method.model_families() == ["clip", "siglip"]
    assert [m.name for m in methods.METHODS.values() if m.own_run] == ["contrastive"]
    assert methods.get("sft").model_families() is None  # the VLM families


def test_inspect_refuses_a_contrastive_recipe_by_name():
    import vlmtune
    from vlmtune.config import load_recipe

    recipe = load_recipe(None, {"method": "contrastive", "model.name_or_path": "builtin:tiny-clip",
                                "data.train": "x.jsonl", "data.format": "caption"}, check_paths=False)
    with pytest.raises(vlmtune.VlmtuneError, match="method contrastive does not build.*vlmtune validate"):
        vlmtune.inspect(recipe)


@pytest.mark.slow
def test_train_validate_eval_a_tiny_clip_recipe(tmp_path, capsys):
    data = make_shape_captions(tmp_path / "data", n_train=12, n_eval=6)
    recipe = tiny_clip_recipe(tmp_path, data, lora="{r: 4, alpha: 8}", steps=3,
                              extra="contrastive: {eval_batch_size: 8}\n")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "(family clip)" in out and "train: 12 image-caption pairs, 36 captions" in out and "OK:" in out

    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "recall@1 image->text" in out and "done: 3 steps" in out
    run = tmp_path / "run"
    meta = json.loads((run / "vlmtune.json").read_text())
    assert meta["method"] == "contrastive" and sorted(p.name for p in run.iterdir()) == meta["files"]
    assert "training_curves.png" in meta["files"]
    saved = json.loads((run / "train_results.json").read_text())

    assert main(["eval", str(run), "--data", str(data / "eval.jsonl"), "--out", str(tmp_path / "ev")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("image<->text retrieval on") and "6 images, 18 captions" in table[0]
    assert table[1].split() == ["metric", "base", "adapter", "delta", "95%", "CI"]
    assert [line.split()[0] for line in table[2:]] == [f"{d}_r@{k}" for k in (1, 5, 10) for d in ("i2t", "t2i")]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["recall"]["adapter"] == pytest.approx(saved["recall"])
    assert summary["recall"]["base"] == pytest.approx(saved["recall_before"])

    (data / "eval.jsonl").write_text('{"image": "images/missing.png", "caption": "a red circle"}\n')
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert "eval.jsonl:1" in out and "missing.png" in out and "would stop training" in out


@pytest.mark.parametrize("given, expected", [({}, 1), ({"train.gradient_accumulation_steps": 4}, 4)])
def test_a_contrastive_recipe_accumulates_one_batch_unless_it_says_otherwise(given, expected, tmp_path):
    from vlmtune.config import load_recipe

    base = {"model.name_or_path": "builtin:tiny-clip", "data.train": "x.jsonl", "data.format": "caption"}
    recipe = load_recipe(None, {"method": "contrastive", **base, **given}, check_paths=False)
    assert recipe.train.gradient_accumulation_steps == expected
    file = tmp_path / "r.yaml"  # the same from a recipe file
    file.write_text("method: contrastive\nmodel: {name_or_path: 'builtin:tiny-clip'}\n"
                    "data: {train: x.jsonl, format: caption}\n"
                    + (f"train: {{gradient_accumulation_steps: {expected}}}\n" if given else ""))
    assert load_recipe(file, check_paths=False).train.gradient_accumulation_steps == expected
    sft = load_recipe(None, {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": "x.jsonl"}, check_paths=False)
    assert sft.train.gradient_accumulation_steps == 8  # the shared default stays for the VLM methods
