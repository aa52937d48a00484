"""A sample whose media fail to load mid-run is skipped, counted and named; past data.max_bad_samples the run stops
with a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune import cli, families, training
from vlmtune.data.collator import collator_for
from vlmtune.data.dataset import BadSample, to_dataset
from vlmtune.data.formatting import IGNORE_INDEX

from .conftest import write_jsonl
from .test_video import _example, clip_file, configured, conv, image, plan, video  # noqa: F401 (clip_file: a fixture)

COLOURS = [("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220)), ("yellow", (220, 220, 0))]


def truncate(path: Path) -> None:
    """Keep the header, lose the pixels: the file passes header checks and fails to decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------ dataset and collator
def test_rows_that_fail_to_load_are_marked_and_the_collator_drops_them(processor_for, clip_file, tmp_path):  # noqa: F811
    family, processor = families.get("qwen2_vl"), configured(processor_for("qwen2_vl"))
    paths = {}
    for name in ("good", "cut", "changed", "frame0", "frame1"):
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (90, 60), (200, 30, 30)).save(paths[name])
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(Path(clip_file).read_bytes())  # a copy: the fixture's file is shared
    rows = {
        "good": conv(("user", image(paths["good"]), "?"), ("assistant", "red")),
        "cut": conv(("user", image(paths["cut"]), "?"), ("assistant", "red")),
        "changed": conv(("user", image(paths["changed"]), "?"), ("assistant", "red")),
        "frames": conv(("user", video([str(paths["frame0"]), str(paths["frame1"])]), "?"), ("assistant", "red")),
        "clip": conv(("user", video(str(clip)), "?"), ("assistant", "dark to light")),
    }
    examples = []
    for k, c in enumerate(rows.values()):
        c.source = f"train.jsonl:{k + 1}"
        counts, _, clips = plan(family, processor, c)
        examples.append(_example(family, processor, c, counts, clips))
    # after preparation: pixels lost, a different image, a video frame lost, a video file cut short
    truncate(paths["cut"])
    Image.new("RGB", (300, 200), (0, 0, 0)).save(paths["changed"])
    truncate(paths["frame1"])
    clip.write_bytes(clip.read_bytes()[:200])

    ds = to_dataset(examples, family, processor, mark_bad=True)
    features = [ds[i] for i in range(len(ds))]
    assert features[0]["bad_sample"] is None
    marks = [f["bad_sample"] for f in features[1:]]
    assert [m["source"] for m in marks] == ["train.jsonl:2", "train.jsonl:3", "train.jsonl:4", "train.jsonl:5"]
    assert "cannot be decoded" in marks[0]["reason"] and str(paths["cut"]) in marks[0]["reason"]
    assert "did an image file change" in marks[1]["reason"]
    assert str(paths["frame1"]) in marks[2]["reason"]
    assert str(clip) in marks[3]["reason"]  # a VideoProblem

    collate = collator_for(families.get("qwen2_vl"), processor.tokenizer.pad_token_id)
    batch = collate(features)
    assert batch["input_ids"].shape[0] == 1 and batch["bad_samples"] == marks
    assert batch["image_grid_thw"].tolist() == [list(g) for g in examples[0].grids]
    alone = collate(features[1:])  # every row failed: one token that supervises nothing
    assert alone["input_ids"].tolist() == [[processor.tokenizer.pad_token_id]]
    assert (alone["labels"] == IGNORE_INDEX).all() and "pixel_values" not in alone and alone["bad_samples"] == marks

    with pytest.raises(BadSample, match=r"train.jsonl:2: image cannot be decoded.*vlmtune validate --decode"):
        to_dataset(examples[1:2], family, processor)[0]  # prediction and merge checks still refuse


# ------------------------------------------------------------------ during training
def shapes_data(folder: Path, n: int) -> tuple[Path, list[Path]]:
    """n one-image rows (file rows 1..n), each image its own file."""
    (folder / "images").mkdir(parents=True)
    rows, paths = [], []
    for k in range(n):
        name, rgb = COLOURS[k % len(COLOURS)]
        path = folder / "images" / f"img{k}.png"
        Image.new("RGB", (56, 56), rgb).save(path)
        paths.append(path)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": f"It is {name}."}]})
    return write_jsonl(folder / "train.jsonl", rows), paths


def break_after_planning(monkeypatch, paths: list[Path]) -> None:
    """The files pass every check before training, then their pixels are lost."""
    real = training.plan_run

    def plan_then_break(recipe):
        planned = real(recipe)
        for p in paths:
            truncate(p)
        return planned

    monkeypatch.setattr(training, "plan_run", plan_then_break)


def settings(data: Path, out: Path, **extra) -> dict:
    base = {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": str(data), "output_dir": str(out),
            "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2, "train.max_steps": 8,
            "train.logging_steps": 1, "train.save_steps": 1000, "train.gradient_checkpointing": False,
            "train.learning_rate": 1e-2, "data.num_workers": 1, "lora.dropout": 0.0}
    base.update(extra)
    return base


def test_bad_samples_mid_run_are_skipped_counted_once_and_named(tmp_path, monkeypatch):
    data, paths = shapes_data(tmp_path, 8)
    break_after_planning(monkeypatch, [paths[1], paths[4], paths[5]])
    # batch size 1: each bad row is a micro-batch of its own that failed whole; 8 steps x 2 = two epochs
    recipe = vlmtune.load_recipe(None, overrides=settings(data, tmp_path / "out"))
    lines = []
    result = vlmtune.train(recipe, log=lines.append)
    assert result.metrics["global_step"] == 8
    saved = json.loads((result.output_dir / "train_results.json").read_text())
    wanted = {f"{data}:{k}" for k in (2, 5, 6)}
    assert saved["bad_sample_count"] == 3 and {b["source"] for b in saved["bad_samples"]} == wanted
    assert all("cannot be decoded" in b["reason"] for b in saved["bad_samples"])
    named = [line for line in lines if line.startswith("skipped bad sample")]
    assert len(named) == 3 and all(any(s + ":" in line for line in named) for s in wanted)  # once, not per epoch
    from safetensors.torch import load_file

    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.parametrize("way_on", ["repair", "raise_the_limit"])
def test_past_the_limit_the_cli_stops_with_the_list_and_a_checkpoint_to_resume(way_on, tmp_path, monkeypatch,
                                                                                capsys):
    data, paths = shapes_data(tmp_path, 8)
    good = {p: p.read_bytes() for p in paths}
    break_after_planning(monkeypatch, [paths[3]])
    out = tmp_path / "out"
    args = [f"{k}={v}" for k, v in settings(data, out, **{"data.max_bad_samples": 0,
                                                          "train.gradient_accumulation_steps": 1}).items()]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  seed: 3\n")
    assert cli.main(["sft", str(recipe), *args]) == 2
    err = capsys.readouterr().err
    assert "1 sample could not be loaded, more than data.max_bad_samples=0" in err
    assert f"{data}:4: image cannot be decoded: {paths[3]}" in err
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and f"checkpoint saved: {checkpoints[0]}" in err
    assert (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    # the message's two ways on, each followed here; removing rows would be a new run
    assert "Repair these files" in err and "then resume with train.resume_from_checkpoint=latest" in err
    assert "data.max_bad_samples raised and data.check_images=header" in err
    assert "Removing rows or changing an image's size changes the data: that is a new run" in err
    monkeypatch.undo()
    if way_on == "repair":
        for p, content in good.items():
            p.write_bytes(content)
        assert cli.main(["sft", str(recipe), *args, "train.resume_from_checkpoint=latest"]) == 0
        assert json.loads((out / "train_results.json").read_text())["bad_sample_count"] == 0
    else:  # the file stays broken; a second epoch meets it again and skips it
        more = ["data.max_bad_samples=1", "data.check_images=header", "train.max_steps=16"]
        assert cli.main(["sft", str(recipe), *args, *more, "train.resume_from_checkpoint=latest"]) == 0
        saved = json.loads((out / "train_results.json").read_text())
        assert saved["global_step"] == 16 and [b["source"] for b in saved["bad_samples"]] == [f"{data}:4"]
