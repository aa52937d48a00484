"""Images checked before training, from the recipe: decoded up front (data.check_images), pixel limits
(data.max_image_pixels), and what validate says about them and about shrink_images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmtune.config import load_recipe
from vlmtune.data import prepare as prepare_module
from vlmtune.data.formatting import Formatter
from vlmtune.families import get
from vlmtune.preflight import check_data, formatting_for

from .conftest import write_jsonl
from .test_cli import GOOD_ROW, recipe, run, workspace  # noqa: F401 - the CLI tests' fixture
from .test_images import fake_png


@pytest.fixture
def folder(request):
    """The CLI tests' workspace: the shapes images and a train.jsonl of four good rows."""
    return request.getfixturevalue("workspace")


def image_row(image: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "q"}]},
                         {"role": "assistant", "content": "a"}]}


@pytest.fixture
def cut_png(folder):
    whole = folder / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    (folder / "cut.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return "cut.png"


def test_a_small_dataset_is_decoded_up_front_by_default(folder, capsys, cut_png):
    write_jsonl(folder / "train.jsonl", [GOOD_ROW, image_row(cut_png), GOOD_ROW])
    code, out, _ = run(capsys, "validate", recipe(folder))
    assert code == 2 and "train.jsonl:2: image cannot be decoded" in out and "cut.png" in out
    assert "images: 2 image files decoded in full" in out
    assert "1 problem would stop training" in out


def test_sft_checks_refuse_a_truncated_image_before_training(folder, cut_png):
    write_jsonl(folder / "train.jsonl", [GOOD_ROW, image_row(cut_png)])
    rec = load_recipe(recipe(folder))
    _, family, formatter = formatting_for(rec)
    splits, problems = check_data(rec, family, formatter)  # what `vlmtune sft` runs before it loads weights
    assert [p.split(": ", 1)[0] for p in problems] == [f"{folder / 'train.jsonl'}:2"]
    assert len(splits["train"].examples) == 1


def test_header_only_checking_is_counted(folder, capsys, cut_png):
    write_jsonl(folder / "train.jsonl", [GOOD_ROW, image_row(cut_png)])
    code, out, _ = run(capsys, "validate", recipe(folder, data__check_images="header"))
    assert code == 0 and "images: 2 image files only header-checked" in out and "validate --decode" in out
    code, out, _ = run(capsys, "validate", recipe(folder, data__check_images="header"), "--decode")
    assert code == 2 and "train.jsonl:2: image cannot be decoded" in out


def test_auto_reads_headers_only_past_its_size(folder, monkeypatch, processor_for, cut_png):
    write_jsonl(folder / "train.jsonl", [GOOD_ROW, image_row(cut_png)])
    family = get("qwen2_vl")
    formatter = Formatter(family, processor_for("qwen2_vl"))
    args = (folder / "train.jsonl", "messages", None, formatter, family, 2048)
    assert len(prepare_module.prepare(*args).problems) == 1
    monkeypatch.setattr(prepare_module, "AUTO_DECODE_MAX_IMAGES", 1)
    data = prepare_module.prepare(*args)
    assert (data.problems, data.header_only, data.decoded) == ([], 2, 0)
    assert len(prepare_module.prepare(*args, check_images="decode").problems) == 1


def test_frames_of_a_frame_list_video_are_decoded_too(folder, processor_for, cut_png):
    frames = ["images/train_0001.png", "images/train_0002.png", cut_png]
    Image.new("RGB", (64, 64)).save(folder / "images" / "frame.png")
    frames[:2] = ["images/frame.png"] * 2
    row = {"messages": [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "q"}]},
                        {"role": "assistant", "content": "a"}]}
    write_jsonl(folder / "train.jsonl", [row])
    family = get("qwen2_vl")
    data = prepare_module.prepare(folder / "train.jsonl", "messages", None,
                                  Formatter(family, processor_for("qwen2_vl")), family, 4096)
    assert [p.row for p in data.problems] == [1] and "cannot be decoded" in data.problems[0].message


def test_a_decompression_bomb_is_a_row_problem_and_the_other_rows_are_reported(folder, capsys):
    fake_png(folder / "bomb.png", 30000, 30000)
    write_jsonl(folder / "train.jsonl", [GOOD_ROW, image_row("bomb.png"), image_row("images/nope.png"), GOOD_ROW])
    for command in ("validate", "sft"):
        code, out, err = run(capsys, command, recipe(folder))
        text = out + err
        assert code == 2 and "Traceback" not in text
        assert "train.jsonl:2: image" in text and "decompression bombs" in text and "data.max_image_pixels" in text
        assert "train.jsonl:3: image not found" in text


def test_the_recipe_pixel_limit_reaches_every_row(folder, capsys):
    code, out, _ = run(capsys, "validate", recipe(folder, data__max_image_pixels=3000))
    assert code == 2 and "4 problems would stop training" in out
    assert "56x56 = 3,136 pixels, over data.max_image_pixels=3,000" in out


def big_image_rows(folder, n: int = 2) -> None:
    Image.new("RGB", (224, 224), (200, 30, 30)).save(folder / "big.png")
    write_jsonl(folder / "train.jsonl", [GOOD_ROW] + [image_row("big.png")] * n)


def test_validate_names_the_rows_shrink_images_would_shrink(folder, capsys):
    big_image_rows(folder)
    code, out, _ = run(capsys, "validate", recipe(folder, data__max_length=48))
    assert "data.on_overlong=shrink_images would keep 2 too-long rows by shrinking their images:" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "would keep 2" in line)
    assert "train.jsonl:2: max_pixels=" in lines[start + 1] and "train.jsonl:3: max_pixels=" in lines[start + 2]


def test_validate_names_the_rows_shrink_images_shrinks(folder, capsys):
    big_image_rows(folder)
    code, out, _ = run(capsys, "validate", recipe(folder, data__max_length=48, data__on_overlong="shrink_images"))
    assert code == 0 and "shrink_images shrinks the images of 2 rows to fit data.max_length:" in out
    assert "train.jsonl:2: max_pixels=" in out and "train.jsonl:3: max_pixels=" in out


def test_predict_names_the_row_of_a_decompression_bomb(folder):
    from vlmtune.errors import VlmtuneError
    from vlmtune.inference import read_prompts, single_prompt

    fake_png(folder / "bomb.png", 30000, 30000)
    path = write_jsonl(folder / "ask.jsonl", [GOOD_ROW, image_row("bomb.png")])
    with pytest.raises(VlmtuneError, match=r"ask.jsonl:2: image .*decompression bombs"):
        read_prompts(path)
    with pytest.raises(VlmtuneError, match="decompression bombs"):
        single_prompt([folder / "bomb.png"], "What is it?")


def test_predict_on_another_format_names_the_row_of_a_decompression_bomb(folder):
    from vlmtune.errors import VlmtuneError
    from vlmtune.inference import read_prompts

    fake_png(folder / "bomb.png", 30000, 30000)
    path = write_jsonl(folder / "ask.jsonl", [{"image": "bomb.png", "question": "q", "answer": "a"}])
    with pytest.raises(VlmtuneError, match=r"ask.jsonl:1: image .*decompression bombs"):
        read_prompts(path, fmt="vqa")  # before any model loads


def test_sft_does_not_search_shrink_bounds_unless_it_shrinks(folder, monkeypatch):
    """Under drop (and error) only validate names the rows shrink_images would keep; sft's checks skip that search."""
    big_image_rows(folder)
    rec = load_recipe(recipe(folder, data__max_length=48))
    _, family, formatter = formatting_for(rec)

    def no_search(*args, **kwargs):
        raise AssertionError("the shrink search ran")

    monkeypatch.setattr(prepare_module, "_shrink", no_search)
    splits, problems = check_data(rec, family, formatter)  # what `vlmtune sft` runs before it loads weights
    assert problems == [] and len(splits["train"].dropped) == 2 and splits["train"].shrinkable == []
    with pytest.raises(AssertionError, match="the shrink search ran"):
        check_data(rec, family, formatter, find_shrinkable=True)  # what validate runs


def test_the_decode_reuses_the_sizes_read_from_the_headers(folder, monkeypatch, processor_for, cut_png):
    write_jsonl(folder / "train.jsonl", [GOOD_ROW, image_row(cut_png), GOOD_ROW])
    family = get("qwen2_vl")
    formatter = Formatter(family, processor_for("qwen2_vl"))
    measured = []
    real = prepare_module.image_size
    monkeypatch.setattr(prepare_module, "image_size", lambda path, *a, **k: measured.append(str(path)) or
                        real(path, *a, **k))
    data = prepare_module.prepare(folder / "train.jsonl", "messages", None, formatter, family, 2048)
    assert data.decoded == 2 and [p.row for p in data.problems] == [2]
    assert sorted(measured) == sorted(set(measured)) and len(measured) == 2  # each file's header read once


@pytest.mark.parametrize("local_rank, decoded", [("0", True), ("1", False)])
def test_only_the_first_process_of_a_machine_decodes_up_front(folder, monkeypatch, cut_png, local_rank, decoded):
    """Every process reads the same files: the first of each machine decodes them (and stops the run on a broken
    one), the others read headers only and leave a file that breaks later to the mid-training guard."""
    from vlmtune.errors import PreflightError
    from vlmtune.preflight import plan_run

    write_jsonl(folder / "train.jsonl", [GOOD_ROW, image_row(cut_png)])
    for key, value in {"RANK": local_rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    # no process group here: the prepared-data cache (whose key rank 0 shares) stays off, only the decode is tested
    rec = load_recipe(recipe(folder), overrides=["data.cache=false"])
    if decoded:
        with pytest.raises(PreflightError, match="train.jsonl:2: image cannot be decoded"):
            plan_run(rec)
    else:
        plan = plan_run(rec)
        assert (len(plan.train.examples), plan.train.decoded, plan.train.header_only) == (2, 0, 2)
