"""Recipe loading: defaults, overrides, every error at once with its field path and a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmtune.config import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("{}\n", encoding="utf-8")
    return p


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny-demo.yaml", "qwen2-vl-2b-lora.yaml", "qwen2-vl-2b-qlora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path, check_paths=path.name == "tiny-demo.yaml")
    assert recipe.model.name_or_path and recipe.data.train


def test_minimal_recipe_gets_defaults(tmp_path, data_file):
    r = load_recipe(write(tmp_path, f"model: {{name_or_path: some/model}}\ndata: {{train: {data_file}}}\n"))
    assert (r.lora.r, r.lora.alpha, r.data.train_on, r.quantization.mode) == (16, 32, "assistant", "none")
    assert r.lora.target_modules is None  # family default


def test_data_paths_resolve_relative_to_the_recipe(tmp_path, data_file, monkeypatch):
    monkeypatch.chdir("/")
    r = load_recipe(write(tmp_path, "model: {name_or_path: m/x}\ndata: {train: train.jsonl}\n"))
    assert Path(r.data.train) == data_file


def test_overrides_apply_and_parse_values(tmp_path, data_file):
    p = write(tmp_path, f"model: {{name_or_path: a/b}}\ndata: {{train: {data_file}}}\n")
    r = load_recipe(p, overrides=["train.learning_rate=1e-4", "output_dir=runs/x", "lora.target_modules=[q_proj]",
                                  "quantization.mode=4bit", "model.dtype=bf16"])
    assert r.train.learning_rate == 1e-4 and r.output_dir == "runs/x"
    assert r.lora.target_modules == ["q_proj"] and r.quantization.mode == "4bit" and r.model.dtype == "bfloat16"
    r = load_recipe(p, overrides={"train.max_steps": 7})
    assert r.train.max_steps == 7


def test_all_errors_are_reported_at_once(tmp_path):
    p = write(tmp_path, """
model: {name_or_path: a/b, dtype: float8}
lora: {r: -4, alpah: 16, dropout: 1.5}
data: {train: missing.jsonl, train_on: asistant, max_length: 0}
train: {learning_rate: fast, per_device_train_batch_size: 0}
wandb: true
""")
    with pytest.raises(RecipeError) as info:
        load_recipe(p)
    messages = [str(e) for e in info.value.errors]
    text = str(info.value)
    assert "lora.r: must be a positive integer, got -4" in messages
    assert "lora.alpah: unknown key; did you mean lora.alpha?" in messages
    assert any(m.startswith("wandb: unknown key") for m in messages)
    assert any(m.startswith("lora.dropout: must be in [0, 1)") for m in messages)
    assert any(m.startswith("model.dtype: must be one of") for m in messages)
    assert any("did you mean 'assistant'" in m for m in messages)
    assert any(m.startswith("data.max_length") for m in messages)
    assert any(m.startswith("data.train: file not found") for m in messages)
    assert any(m.startswith("train.learning_rate: must be a number") for m in messages)
    assert any(m.startswith("train.per_device_train_batch_size") for m in messages)
    assert len(messages) == 10 and str(p) in text


@pytest.mark.parametrize("text, expected", [
    ("model: [1, 2]", "model: must be a mapping"),
    ("data: {train: x}\n", "model.name_or_path: is required"),
    (": : :", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping of sections"),
    ("model: {name_or_path: a/b}\ndata: {train: x, min_pixels: 100}", "data.min_pixels: must be at least 784"),
    ("model: {name_or_path: a/b}\ntrain: {eval_steps: 10}\ndata: {train: x}", "train.eval_steps: needs data.eval"),
    ("model: {name_or_path: a/b, family: llama}\ndata: {train: x}", "model.family: must be auto or one of"),
    ("model: {name_or_path: a/b}\ndata: {train: x}\nlora: {train_projector: maybe}",
     "lora.train_projector: must be true or false, got 'maybe'"),
])
def test_single_errors_name_the_field(tmp_path, text, expected):
    with pytest.raises(RecipeError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        load_recipe(write(tmp_path, text), check_paths=False)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("does/not/exist.yaml")


def test_bad_override_syntax(tmp_path, data_file):
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(write(tmp_path, f"model: {{name_or_path: a/b}}\ndata: {{train: {data_file}}}"),
                    overrides=["train.max_steps"])
