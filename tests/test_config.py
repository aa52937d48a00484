"""Recipe loading: defaults, overrides, every error at once with its field path and a fix."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import yaml

from vlmtune import families, methods
from vlmtune.config import BOUNDS, RecipeError, dump, load_recipe, numeric_fields

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
BASE = {"model.name_or_path": "a/b", "data.train": "x"}


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


def recipe_family(recipe) -> str:
    """The family a shipped recipe is for, by name: its builtin tiny model's, else the model.family it must name (so
    that it validates without the hub), one of its method's families (the VLM families unless the method has its
    own: a dual encoder's)."""
    name = recipe.model.name_or_path
    own = methods.get(recipe.method).model_families()
    if name.startswith("builtin:") and own is None:
        return families.by_tiny_name(name.removeprefix("builtin:")).name
    assert recipe.model.family != "auto", f"{name}: set model.family (the hub is not read here)"
    assert recipe.model.family in (own or families.names())
    return recipe.model.family


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    """Every field valid, and each one the recipe's family takes (check_runtime: e.g. no data.min_pixels for LLaVA;
    a method with its own run checks its fields in validate)."""
    from vlmtune.modeling import check_runtime

    recipe = load_recipe(path, check_paths=path.name == "tiny-demo.yaml")
    assert recipe.model.name_or_path and recipe.data.train
    family = recipe_family(recipe)
    if recipe.model.family != "auto":
        assert recipe.model.family == family
    if methods.get(recipe.method).own_run:
        return
    missing = set() if importlib.util.find_spec("bitsandbytes") else {"quantization.mode"}  # this machine's packages
    assert [str(e) for e in check_runtime(recipe, families.get(family)) if e.path not in missing] == []


def test_every_family_has_a_recipe_at_a_real_size():
    """The VLM families and those of each method with its own (the dual encoders')."""
    recipes = [load_recipe(p, check_paths=False) for p in RECIPES]
    real = {recipe_family(r) for r in recipes if not r.model.name_or_path.startswith("builtin:")}
    wanted = set(families.names()).union(*(m.model_families() or () for m in methods.METHODS.values()))
    assert sorted(wanted - real) == []


def test_minimal_recipe_gets_defaults(tmp_path, data_file):
    r = load_recipe(write(tmp_path, f"model: {{name_or_path: some/model}}\ndata: {{train: {data_file}}}\n"))
    assert (r.lora.r, r.lora.alpha, r.data.train_on, r.quantization.mode) == (16, 32, "assistant", "none")
    assert r.lora.target_modules is None  # family default


def test_data_paths_resolve_relative_to_the_recipe(tmp_path, data_file, monkeypatch):
    monkeypatch.chdir("/")
    r = load_recipe(write(tmp_path, "model: {name_or_path: m/x}\ndata: {train: train.jsonl}\n"))
    assert Path(r.data.train) == data_file


def test_every_path_in_a_recipe_file_is_relative_to_its_folder(tmp_path, monkeypatch):
    here = tmp_path / "recipes"
    (here / "model").mkdir(parents=True)
    work = tmp_path / "work"
    for folder in (here, work):  # the same names in the working directory must not be picked up
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "eval.jsonl", "ds.json", "hosts"):
            (folder / name).write_text("{}\n")
    monkeypatch.chdir(work)
    r = load_recipe(write(here, """
model: {name_or_path: ./model}
data: {train: train.jsonl, eval: ../recipes/eval.jsonl, image_root: images}
train: {resume_from_checkpoint: runs/old/checkpoints/checkpoint-5}
distributed: {deepspeed: ds.json, hostfile: hosts}
output_dir: ../runs/out
"""), check_paths=False)
    assert {key: Path(value) for key, value in [
        ("model", r.model.name_or_path), ("train", r.data.train), ("eval", r.data.eval),
        ("image_root", r.data.image_root), ("resume", r.train.resume_from_checkpoint),
        ("deepspeed", r.distributed.deepspeed), ("hostfile", r.distributed.hostfile), ("out", r.output_dir)]} == {
        "model": here / "model", "train": here / "train.jsonl", "eval": here / "eval.jsonl",
        "image_root": here / "images", "resume": here / "runs/old/checkpoints/checkpoint-5",
        "deepspeed": here / "ds.json", "hostfile": here / "hosts", "out": tmp_path / "runs/out"}


def test_names_that_are_not_paths_stay_names(tmp_path):
    r = load_recipe(write(tmp_path, """
model: {name_or_path: Qwen/Qwen2-VL-2B-Instruct}
data: {train: x}
train: {resume_from_checkpoint: latest}
distributed: {deepspeed: zero2}
"""), check_paths=False)
    assert (r.model.name_or_path, r.train.resume_from_checkpoint, r.distributed.deepspeed) == (
        "Qwen/Qwen2-VL-2B-Instruct", "latest", "zero2")
    (tmp_path / "Qwen" / "Qwen2-VL-2B-Instruct").mkdir(parents=True)  # a local folder of that name wins
    r = load_recipe(write(tmp_path, "model: {name_or_path: Qwen/Qwen2-VL-2B-Instruct}\ndata: {train: x}\n"),
                    check_paths=False)
    assert Path(r.model.name_or_path) == tmp_path / "Qwen" / "Qwen2-VL-2B-Instruct"


def test_a_missing_file_is_not_looked_for_in_the_working_directory(tmp_path, monkeypatch):
    here, work = tmp_path / "recipes", tmp_path / "work"
    here.mkdir()
    work.mkdir()
    (work / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(work)
    with pytest.raises(RecipeError, match="data.train: file not found: .*recipes.train.jsonl"):
        load_recipe(write(here, "model: {name_or_path: a/b}\ndata: {train: train.jsonl}\n"))


def test_override_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    here, work = tmp_path / "recipes", tmp_path / "work"
    here.mkdir()
    work.mkdir()
    (here / "train.jsonl").write_text("{}\n")  # next to the recipe, but the override was typed in work/
    monkeypatch.chdir(work)
    p = write(here, "model: {name_or_path: a/b}\ndata: {train: x}\n")
    r = load_recipe(p, overrides=["data.train=train.jsonl", "output_dir=out", "model.name_or_path=./m"],
                    check_paths=False)
    assert (Path(r.data.train), Path(r.output_dir), Path(r.model.name_or_path)) == (
        work / "train.jsonl", work / "out", work / "m")
    r = load_recipe(None, overrides={"data": {"train": "train.jsonl"}, "model.name_or_path": "a/b"}, check_paths=False)
    assert Path(r.data.train) == work / "train.jsonl"


def test_tiny_demo_writes_runs_beside_recipes_and_its_saved_copy_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(ROOT / "recipes" / "tiny-demo.yaml")
    assert Path(r.output_dir) == ROOT / "runs" / "tiny-demo"
    saved = tmp_path / "elsewhere" / "recipe.yaml"  # what training writes into the run folder
    saved.parent.mkdir()
    saved.write_text(dump(r))
    again = load_recipe(saved)
    assert (again.output_dir, again.data.train, again.data.eval) == (r.output_dir, r.data.train, r.data.eval)


def test_overrides_apply_and_parse_values(tmp_path, data_file):
    p = write(tmp_path, f"model: {{name_or_path: a/b}}\ndata: {{train: {data_file}}}\n")
    r = load_recipe(p, overrides=["train.learning_rate=1e-4", "output_dir=runs/x", "lora.target_modules=[q_proj]",
                                  "quantization.mode=4bit", "model.dtype=bf16"])
    assert r.train.learning_rate == 1e-4 and Path(r.output_dir) == Path.cwd() / "runs/x"
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
    ("model: {name_or_path: a/b}\ndata: {train: x, min_pixels: 0}", "data.min_pixels: must be > 0, got 0"),  # floor: family
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


# --- numbers ----------------------------------------------------------------------------------------------------------

def test_every_number_field_has_a_range():
    fields = numeric_fields()
    assert {"train.learning_rate", "train.max_grad_norm", "lora.alpha", "data.video_fps", "distributed.master_port",
            "train.max_nonfinite_steps", "data.max_bad_samples"} <= set(fields)
    assert set(fields) == set(BOUNDS), "a number field of the schema needs its entry in config.BOUNDS"


@pytest.mark.parametrize("path", sorted(numeric_fields()))
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "inf", "nan", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(path, text):
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides=[f"{k}={v}" for k, v in BASE.items()] + [f"{path}={text}"], check_paths=False)
    assert [e.path for e in info.value.errors] == [path], str(info.value)


def test_non_finite_numbers_in_a_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "model: {name_or_path: a/b}\ndata: {train: x}\n"
                                    "train: {learning_rate: .inf, weight_decay: .nan, max_grad_norm: -.inf}\n"),
                    check_paths=False)
    assert [str(e) for e in info.value.errors] == [
        "train.learning_rate: must be a finite number (> 0), got inf",
        "train.weight_decay: must be a finite number (>= 0), got nan",
        "train.max_grad_norm: must be a finite number (>= 0), got -inf; 0 turns gradient clipping off"]


def _edges(path: str, kind: type) -> tuple[list, list]:
    """Values just inside and just outside a field's range."""
    b = BOUNDS[path]
    step = 1 if kind is int else 0.5
    inside, outside = list(b.also), []
    if b.low is not None:
        (outside if b.low_open else inside).append(kind(b.low))
        outside.append(kind(b.low - step))
        inside.append(kind(b.low + step) if b.high is None or b.low + step < b.high else kind(b.low))
    if b.high is not None:
        (outside if b.high_open else inside).append(kind(b.high))
        outside.append(kind(b.high + step))
    return [v for v in inside if v not in outside], outside


@pytest.mark.parametrize("path", sorted(numeric_fields()))
def test_every_range_is_checked(path):
    kind = numeric_fields()[path]
    inside, outside = _edges(path, kind)
    assert inside and outside
    extra = {"train.num_train_epochs": {"train.max_steps": 5}, "train.eval_steps": {"data.eval": "y"},
             "distributed.node_rank": {"distributed.num_nodes": 4}}.get(path, {})  # what the other fields need
    for value in inside:
        load_recipe(None, overrides={**BASE, **extra, path: value}, check_paths=False)
    for value in outside:
        with pytest.raises(RecipeError) as info:
            load_recipe(None, overrides={**BASE, **extra, path: value}, check_paths=False)
        messages = [str(e) for e in info.value.errors]
        assert len(messages) == 1 and messages[0].startswith(f"{path}: must be ")
        assert f"got {value}" in messages[0]


@pytest.mark.parametrize("override, expected", [
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0, got -1.0; 0 turns gradient clipping off"),
    ("train.warmup_ratio=1", "train.warmup_ratio: must be in [0, 1), got 1.0"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0, got -0.1"),
    ("train.max_steps=0", "train.max_steps: must be -1 or a positive integer, got 0; -1 trains for num_train_epochs"),
    ("train.save_total_limit=0", "train.save_total_limit: must be a positive integer, got 0; null keeps every"),
    ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1"),
    ("lora.alpha=0", "lora.alpha: must be > 0, got 0"),
    ("data.video_fps=0", "data.video_fps: must be > 0, got 0.0; frames sampled per second"),
    ("data.max_bad_samples=-1", "data.max_bad_samples: must be >= 0, got -1; 0 stops on the first bad sample"),
    ("data.max_image_pixels=0", "data.max_image_pixels: must be in [1, 178956970], got 0; Pillow refuses larger"),
    ("data.max_image_pixels=200000000", "data.max_image_pixels: must be in [1, 178956970], got 200000000"),
    ("data.max_row_bytes=0", "data.max_row_bytes: must be a positive integer, got 0"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps: must be a positive integer, got 0"),
    ("distributed.master_port=65536", "distributed.master_port: must be in [1, 65535], got 65536; a TCP port"),
    ("data.check_images=full", "data.check_images: must be one of auto, decode, header, got 'full'"),
])
def test_range_messages_name_field_value_and_range(override, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides=[f"{k}={v}" for k, v in BASE.items()] + [override], check_paths=False)
    assert [str(e) for e in info.value.errors if str(e).startswith(expected)], str(info.value)


def test_max_grad_norm_zero_turns_clipping_off_and_a_negative_one_is_refused():
    assert load_recipe(None, overrides={**BASE, "train.max_grad_norm": 0}, check_paths=False).train.max_grad_norm == 0
    with pytest.raises(RecipeError, match="0 turns gradient clipping off"):
        load_recipe(None, overrides={**BASE, "train.max_grad_norm": -1}, check_paths=False)


def test_a_recipe_built_in_code_is_checked_too():
    from vlmtune.config import validate

    r = load_recipe(None, overrides=BASE, check_paths=False)
    r.train.learning_rate, r.lora.r = math.inf, "8"
    assert [str(e) for e in validate(r, check_paths=False)] == [
        "lora.r: must be an integer, got '8'", "train.learning_rate: must be a finite number (> 0), got inf"]


# --- keys in the wrong place ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, expected", [
    ("train.num_workers", "train.num_workers: unknown key; did you mean data.num_workers?"),
    ("model.learning_rate", "model.learning_rate: unknown key; did you mean train.learning_rate?"),
    ("learning_rate", "learning_rate: unknown key; did you mean train.learning_rate?"),
    ("data.output_dir", "data.output_dir: unknown key; did you mean output_dir?"),
    ("train.deepspeed", "train.deepspeed: unknown key; did you mean distributed.deepspeed?"),
    ("train.num_worker", "train.num_worker: unknown key; did you mean data.num_workers?"),
])
def test_a_key_in_the_wrong_section_points_to_its_section(key, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides={**BASE, key: 2}, check_paths=False)
    assert [str(e) for e in info.value.errors] == [expected]


def test_a_misplaced_key_in_a_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"train.num_workers: unknown key; did you mean data.num_workers\?"):
        load_recipe(write(tmp_path, yaml.safe_dump({"model": {"name_or_path": "a/b"}, "data": {"train": "x"},
                                                    "train": {"num_workers": 4}})), check_paths=False)
