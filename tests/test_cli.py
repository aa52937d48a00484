"""The CLI end to end on the embedded demo, and every bad input caught before training with a clear message."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmtune.cli import main
from vlmtune.config import load_recipe
from vlmtune.families import get
from vlmtune.modeling import check_runtime

from .conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"
GOOD_ROW = {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/train_0001.png"},
                                                      {"type": "text", "text": "What is this?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "Shapes."}]}]}


@pytest.mark.slow
def test_sft_tiny_demo_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "vlmtune.cli", "sft", str(ROOT / "recipes" / "tiny-demo.yaml"),
                           f"output_dir={out}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" in proc.stdout and "trainable" in proc.stdout
    assert f"training curves: {out / 'training_curves.png'}" in proc.stdout and (out / "training_curves.png").is_file()
    assert re.search(r"best checkpoint: step \d+ \(eval_token_f1 [0-9.]+\)", proc.stdout)
    results = json.loads((out / "train_results.json").read_text())
    assert results["eval_loss"] < 3.0, results  # starts near ln(vocab) = 6.9
    meta = json.loads((out / "vlmtune.json").read_text())
    base = AutoModelForImageTextToText.from_pretrained(
        __import__("vlmtune.modeling", fromlist=["x"]).resolve_model_path(meta["base_model"]))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, out)(input_ids=ids).logits
    assert not torch.allclose(before, after)


def run(capsys, *args):
    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def workspace(tmp_path):
    shutil.copytree(SHAPES / "images", tmp_path / "images")
    write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW] * 4)
    return tmp_path


def recipe(workspace, **fields):
    import yaml

    doc = {"model": {"name_or_path": "builtin:tiny-qwen2-vl"}, "data": {"train": "train.jsonl"},
           "train": {"max_steps": 1, "per_device_train_batch_size": 2}, "output_dir": str(workspace / "out")}
    for key, value in fields.items():
        section, _, name = key.partition("__")
        if name:
            doc.setdefault(section, {})[name] = value
        else:
            doc[section] = value
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_reports_ok(workspace, capsys):
    code, out, _ = run(capsys, "validate", recipe(workspace))
    assert code == 0 and "recipe OK" in out and "4 rows -> 4 examples" in out


BAD_ROWS = [
    ("not json", "train.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "train.jsonl:2: no assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                   {"role": "assistant", "content": "x"}]}, "train.jsonl:2: message 0 part 0: an audio part, but no "
                                                            "model family vlmtune trains takes audio"),
    ({"messages": [{"role": "user", "content": [{"type": "sticker", "sticker": "s.png"}]},
                   {"role": "assistant", "content": "x"}]}, "train.jsonl:2: message 0 part 0: unknown content part"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "images/nope.png"}]},
                   {"role": "assistant", "content": "x"}]}, "train.jsonl:2: image not found"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]},
                   {"role": "assistant", "content": "x"}]}, "train.jsonl:2: image cannot be read"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "train.jsonl:2: message 0: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "train.jsonl:2: message 1: the assistant reply is empty"),
    ({"conversations": []}, 'train.jsonl:2: expected an object with a "messages" list'),
]


@pytest.mark.parametrize("row, expected", BAD_ROWS, ids=[e.split(": ", 1)[1][:30] for _, e in BAD_ROWS])
def test_bad_rows_are_reported_with_file_and_row(workspace, capsys, row, expected):
    (workspace / "broken.png").write_bytes(b"\x89PNG not really")
    write_jsonl(workspace / "train.jsonl", [GOOD_ROW, row, GOOD_ROW])
    code, _, err = run(capsys, "sft", recipe(workspace))
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (workspace / "out").exists()  # nothing trained, nothing written


def test_all_data_problems_are_reported_together(workspace, capsys):
    write_jsonl(workspace / "train.jsonl", ["{bad", GOOD_ROW, {"messages": [{"role": "user", "content": "q"}]}])
    code, out, _ = run(capsys, "validate", recipe(workspace))
    assert code == 2 and "2 problems would stop training" in out
    assert "train.jsonl:1: not valid JSON" in out and "train.jsonl:3: no assistant message" in out
    code, _, err = run(capsys, "sft", recipe(workspace))
    assert code == 2 and "2 problems found before training" in err and ":1:" in err and ":3:" in err


@pytest.mark.parametrize("fields, expected", [
    ({"model__name_or_path": "./no/such/folder"}, "model.name_or_path: folder not found"),
    ({"model__name_or_path": "builtin:tiny-llama"}, "unknown built-in model 'tiny-llama'"),
    ({"model__attn_implementation": "flash_attention_2"}, "model.attn_implementation: flash_attention_2 needs"),
    ({"model__dtype": "float16"}, "model.dtype: float16 is known to overflow in Qwen2-VL"),
    ({"data__train": "missing.jsonl"}, "data.train: file not found"),
    ({"lora__r": -4, "train__learning_rate": "fast"}, "lora.r: must be a positive integer, got -4"),
])
def test_bad_recipes_and_models_exit_cleanly(workspace, capsys, fields, expected):
    code, _, err = run(capsys, "sft", recipe(workspace, **fields))
    assert code == 2 and expected in err and "Traceback" not in err


def test_unsupported_model_family_lists_the_supported_ones(workspace, capsys):
    folder = workspace / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run(capsys, "sft", recipe(workspace, model__name_or_path=str(folder)))
    assert code == 2 and "'llama' is not a supported family" in err and "qwen2_vl" in err


def test_debug_flag_shows_the_traceback(workspace, capsys):
    code, _, err = run(capsys, "sft", recipe(workspace, data__train="missing.jsonl"), "--debug")
    assert code == 2 and "Traceback" in err


def test_bf16_on_a_gpu_without_bf16_is_refused(workspace, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    r = load_recipe(recipe(workspace, model__dtype="bfloat16"))
    errors = [str(e) for e in check_runtime(r, get("qwen2_vl"))]
    assert any("Tesla T4) does not support bfloat16" in e for e in errors)


@pytest.mark.parametrize("policy", ["drop", "error"])
def test_samples_too_long_for_max_length_are_never_cut(workspace, capsys, policy):
    long_row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/train_0001.png"},
                                                          {"type": "text", "text": "word " * 200}]},
                             {"role": "assistant", "content": "x"}]}
    write_jsonl(workspace / "train.jsonl", [GOOD_ROW, long_row, GOOD_ROW])
    code, out, err = run(capsys, "validate", recipe(workspace, data__max_length=120, data__on_overlong=policy))
    if policy == "drop":
        assert code == 0 and "dropped 1" in out and "dropped: " in out and "train.jsonl:2" in out
    else:
        assert code == 2 and "error: " in out and "train.jsonl:2:" in out and "do not fit data.max_length=120" in out


def test_inspect_json_lines_are_machine_readable(workspace, capsys):
    write_jsonl(workspace / "train.jsonl", [GOOD_ROW, {"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "yo"}]}])
    code, out, _ = run(capsys, "inspect", recipe(workspace), "--json", "--num", "5")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [x["index"] for x in lines] == [0, 1]
    assert set(lines[0]) >= {"index", "input_ids", "labels", "num_image_tokens", "dropped"}
    assert lines[0]["num_image_tokens"] == 4 and lines[1]["num_image_tokens"] == 0
    assert all(len(x["input_ids"]) == len(x["labels"]) and not x["dropped"] for x in lines)
    code, out, _ = run(capsys, "inspect", recipe(workspace), "--json", "--index", "1")
    assert [json.loads(line)["index"] for line in out.splitlines()] == [1]


def test_inspect_text_highlights_replies_and_collapses_images(workspace, capsys):
    code, out, _ = run(capsys, "inspect", recipe(workspace), "--num", "1")
    assert code == 0 and "<image ×4>" in out and "[[Shapes.<|im_end|>]]" in out
    assert "4 image tokens" in out and "kept" in out


def test_inspect_marks_dropped_samples(workspace, capsys):
    code, out, _ = run(capsys, "inspect", recipe(workspace, data__max_length=20), "--json", "--num", "1")
    sample = json.loads(out.splitlines()[0])
    assert sample["dropped"] and "do not fit" in sample["problem"]


def test_validate_reports_every_bad_case_of_a_broken_corpus(workspace, capsys):
    """One file holding each bad case: validate names every one by row, and exits non-zero."""
    (workspace / "broken.png").write_bytes(b"\x89PNG not really")
    long_row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/train_0001.png"},
                                                          {"type": "text", "text": "word " * 400}]},
                             {"role": "assistant", "content": "x"}]}
    mismatch = {"messages": [{"role": "user", "content": [{"type": "text", "text": "<|image_pad|> what?"}]},
                             {"role": "assistant", "content": "x"}]}
    rows = [GOOD_ROW] + [row for row, _ in BAD_ROWS] + [long_row, mismatch, GOOD_ROW]
    write_jsonl(workspace / "train.jsonl", rows)
    code, out, _ = run(capsys, "validate", recipe(workspace, data__max_length=300, data__on_overlong="error"))
    assert code == 2
    for k, (_, expected) in enumerate(BAD_ROWS, start=2):
        assert expected.replace("train.jsonl:2", f"train.jsonl:{k}") in out, expected
    n = len(BAD_ROWS)
    assert f"train.jsonl:{n + 2}: " in out and "do not fit data.max_length=300" in out
    assert f"train.jsonl:{n + 3}: " in out and "image placeholders" in out
    assert f"train.jsonl:{n + 4}: duplicate of row 1" in out
    assert f"{n + 2} problems would stop training" in out


@pytest.mark.parametrize("args, expected", [
    (["sft", "{recipe}", "train.learning_rate=[1"], "train.learning_rate: the override value '[1' is not valid YAML"),
    (["sft", "{folder}"], "is a folder; give the recipe's YAML file"),
    (["inspect", "{recipe}", "--index", "99"], "--index 99: "),
])
def test_user_mistakes_never_end_in_a_traceback(workspace, capsys, args, expected):
    args = [a.format(recipe=recipe(workspace), folder=workspace) for a in args]
    code, _, err = run(capsys, *args)
    assert code == 2 and expected in err and "Traceback" not in err


def test_debug_before_the_command_is_honoured(workspace, capsys):
    code, _, err = run(capsys, "--debug", "sft", recipe(workspace, data__train="missing.jsonl"))
    assert code == 2 and "Traceback" in err


def test_validate_decode_finds_images_whose_pixels_are_broken(workspace, capsys):
    data = (workspace / "images" / "train_0001.png").read_bytes()
    (workspace / "cut.png").write_bytes(data[: len(data) // 2])
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "cut.png"},
                                                     {"type": "text", "text": "q"}]},
                        {"role": "assistant", "content": "a"}]}
    write_jsonl(workspace / "train.jsonl", [GOOD_ROW, row])
    code, _, _ = run(capsys, "validate", recipe(workspace, data__check_images="header"))
    assert code == 0  # the header alone reads fine
    code, out, _ = run(capsys, "validate", recipe(workspace, data__check_images="header"), "--decode")
    assert code == 2 and "train.jsonl:2: image cannot be decoded" in out
