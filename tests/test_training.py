"""Training: only LoRA weights change, QLoRA runs, the output folder is complete and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune import families
from vlmtune.training import build_trainer

from .conftest import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 24 shapes rows, image paths made absolute."""
    out = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = (SHAPES / "train.jsonl").read_text().splitlines()[:24]
    out.write_text("\n".join(lines) + "\n")
    return out


def recipe_for(family, data, tmp_path, **overrides):
    from .conftest import BUILTIN

    base = {"model.name_or_path": f"builtin:{BUILTIN[family]}", "data.train": str(data),
            "data.image_root": str(SHAPES), "output_dir": str(tmp_path / "out"), "train.max_steps": 3,
            "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
            "train.learning_rate": 1e-2, "train.logging_steps": 1, "train.save_steps": 1000,
            "train.gradient_checkpointing": True, "data.num_workers": 0, "lora.dropout": 0.0}
    base.update(overrides)
    return vlmtune.load_recipe(None, overrides=base)


def snapshot(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def lora_modules(model) -> set[str]:
    """Paths (from the base model's root) of the modules that got LoRA weights."""
    return {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n, _ in model.named_parameters()
            if "lora_" in n}


def default_targets(model, family) -> set[str]:
    """The family's default LoRA targets in this model: its language model's linear layers of those names."""
    return {n for n, m in model.get_base_model().named_modules()
            if isinstance(getattr(m, "base_layer", m), torch.nn.Linear) and not n.endswith(".base_layer")
            and family.component_of(n) == "language" and not n.startswith("lm_head")
            and n.rsplit(".", 1)[-1] in family.default_lora_targets}


# bf16 LoRA, and 4-bit QLoRA (bf16 compute): the dtype and quantization settings of each
SETUPS = {"bf16-lora": {"model.dtype": "bfloat16", "quantization.mode": "none"},
          "4bit-qlora": {"model.dtype": "bfloat16", "quantization.mode": "4bit", "quantization.compute_dtype": "bfloat16"}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_steps_change_every_lora_weight_and_nothing_else(family, setup, small_data, tmp_path):
    if setup == "4bit-qlora":
        pytest.importorskip("bitsandbytes")
    fam = families.get(family)
    # 2 constant-rate steps: the first moves every lora_B off zero, the second then moves every lora_A
    recipe = recipe_for(family, small_data, tmp_path, **{**SETUPS[setup], "train.max_steps": 2, "train.warmup_ratio": 0.0,
                                                          "train.lr_scheduler_type": "constant"})
    plan = vlmtune.plan(recipe)
    trainer, report = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    assert report["vision"][0] == 0 and report["projector"][0] == 0 and report["language"][0] > 0
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    after = snapshot(trainer.model)
    lora = [n for n in before if "lora_" in n]
    assert lora and all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())
    assert {p.dtype for n, p in trainer.model.named_parameters() if "lora_" not in n and p.is_floating_point()
            and fam.component_of(n) == "vision"} == {torch.bfloat16}
    unchanged_lora = [n for n in lora if torch.equal(before[n], after[n])]
    assert not unchanged_lora, unchanged_lora[:5]
    changed_other = [n for n in before if "lora_" not in n and not torch.equal(before[n], after[n])]
    assert not changed_other, changed_other[:5]
    if setup == "4bit-qlora":
        import bitsandbytes as bnb

        linear4 = [n.removeprefix("base_model.model.") for n, m in trainer.model.named_modules()
                   if isinstance(m, bnb.nn.Linear4bit)]
        assert linear4 and {fam.component_of(n) for n in linear4} == {"language"}  # vision tower left unquantized
        assert not [n for n in linear4 if n.startswith(fam.skip_quantization)]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_only_the_language_model_by_default(family, small_data, tmp_path):
    recipe = recipe_for(family, small_data, tmp_path)
    plan = vlmtune.plan(recipe)
    trainer, _ = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    fam = families.get(family)
    got = lora_modules(trainer.model)
    assert got and {fam.component_of(n) for n in got} == {"language"}
    assert got == default_targets(trainer.model, fam)


def test_vision_tower_and_projector_can_be_trained(small_data, tmp_path):
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"lora.train_projector": True})
    _, report = build_trainer(vlmtune.plan(recipe), tmp_path / "c1", log=lambda *_: None)
    assert report["projector"][0] > 0 and report["vision"][0] == 0
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"lora.train_vision_tower": True})
    _, report = build_trainer(vlmtune.plan(recipe), tmp_path / "c2", log=lambda *_: None)
    assert report["projector"][0] > 0 and report["vision"][0] > 0


def test_a_run_that_trains_nothing_is_refused(small_data, tmp_path):
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"lora.target_modules": ["no_such_layer"]})
    with pytest.raises(vlmtune.VlmtuneError, match="lora.target_modules"):
        build_trainer(vlmtune.plan(recipe), tmp_path / "c", log=lambda *_: None)


def test_train_writes_a_complete_adapter_folder_that_changes_logits(small_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"data.max_pixels": 3136 * 4})
    result = vlmtune.train(recipe, log=lambda *_: None)
    out = result.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "vlmtune.json",
                 "train_results.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    meta = json.loads((out / "vlmtune.json").read_text())
    assert meta["family"] == "qwen2_vl" and meta["train_on"] == "assistant"
    assert meta["pixel_bounds"]["max_pixels"] == 3136 * 4
    assert AutoProcessor.from_pretrained(out).image_processor.size["longest_edge"] == 3136 * 4
    assert result.metrics["global_step"] == 3 and 0 < result.metrics["supervised_fraction"] < 1

    base_dir = vlmtune.modeling.resolve_model_path(recipe.model.name_or_path)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, out)
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_interrupted_save_leaves_no_half_written_adapter(small_data, tmp_path, monkeypatch):
    from vlmtune import training

    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"train.max_steps": 1})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "dump", interrupted)  # fails after the adapter is staged, before it is moved
    with pytest.raises(KeyboardInterrupt):
        vlmtune.train(recipe, log=lambda *_: None)
    out = Path(recipe.output_dir)
    leftovers = sorted(p.name for p in out.iterdir() if p.name not in ("checkpoints", "logs"))
    assert leftovers == [], leftovers


def test_cli_exits_130_on_ctrl_c(monkeypatch, capsys):
    from vlmtune import cli, training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert cli.main(["sft", str(ROOT / "recipes" / "tiny-demo.yaml")]) == 130
    assert "nothing was written" in capsys.readouterr().err


def test_group_by_length_batches_similar_lengths(tmp_path):
    recipe = recipe_for("qwen2_vl", SHAPES / "train.jsonl", tmp_path, **{"train.group_by_length": True,
                                                            "train.per_device_train_batch_size": 4})
    plan = vlmtune.plan(recipe)
    trainer, _ = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    lengths = [len(e.input_ids) for e in plan.train.examples]
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(lengths)))

    def padding(indices):
        batches = [indices[i:i + 4] for i in range(0, len(indices), 4)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    assert padding(order) < padding(list(range(len(lengths))))
    trainer.train()  # the sampler drives a real run


def test_resume_from_the_latest_checkpoint_continues_the_same_run(small_data, tmp_path):
    from safetensors.torch import load_file

    common = {"train.max_steps": 4, "train.save_steps": 2, "train.per_device_train_batch_size": 4,
              "train.lr_scheduler_type": "constant", "train.warmup_ratio": 0.0}
    straight = recipe_for("qwen2_vl", small_data, tmp_path / "a", **common)
    vlmtune.train(straight, log=lambda *_: None)
    # the same run, stopped after step 2 (its checkpoint-2), then resumed to step 4
    interrupted = recipe_for("qwen2_vl", small_data, tmp_path / "b", **{**common, "train.max_steps": 2})
    vlmtune.train(interrupted, log=lambda *_: None)
    resumed = recipe_for("qwen2_vl", small_data, tmp_path / "b",
                         **{**common, "train.resume_from_checkpoint": "latest"})
    result = vlmtune.train(resumed, log=lambda *_: None)
    assert result.metrics["global_step"] == 4
    a = load_file(Path(straight.output_dir) / "adapter_model.safetensors")
    b = load_file(Path(resumed.output_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: seeded LoRA init, restored optimizer and data order


def test_resume_without_a_checkpoint_is_a_clear_error(small_data, tmp_path):
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"train.resume_from_checkpoint": "latest"})
    with pytest.raises(vlmtune.VlmtuneError, match="no checkpoint-N folder"):
        vlmtune.train(recipe, log=lambda *_: None)


def test_a_misspelled_lora_target_is_named(small_data, tmp_path):
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"lora.target_modules": ["q_proj", "vproj"]})
    with pytest.raises(vlmtune.VlmtuneError, match="lora.target_modules: vproj match no linear layer.*v_proj"):
        build_trainer(vlmtune.plan(recipe), tmp_path / "c", log=lambda *_: None)
