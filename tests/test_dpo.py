"""DPO: the trainer's log-probabilities, a few steps on synthetic pairs (bf16 LoRA, 4-bit QLoRA), starting from an
SFT adapter, merging and predicting. Pairs are built through the SFT formatting path: two conversations with the
same user turn and image, one reply each."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune.data.preference import PreferencePair, PreparedPairs
from vlmtune.training import build_trainer

from .conftest import BUILTIN, FAMILIES, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"
FAMILY = "qwen2_vl"
QUESTIONS = [("images/train_0001.png", "Which shape is green?", "The square is green.", "A red circle, I think."),
             ("images/train_0002.png", "Which shape is on the left?", "The triangle.", "There is nothing there at all."),
             ("images/train_0003.png", "How many shapes are there?", "One shape.", "Seven purple shapes, maybe more."),
             ("images/train_0004.png", "Which shape is yellow?", "The triangle is yellow.", "No idea.")]


def _conversation(image, question, reply):
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": reply}]}]}


def _recipe(data, out, family=FAMILY, **overrides):
    base = {"model.name_or_path": f"builtin:{BUILTIN[family]}", "data.train": str(data),
            "data.image_root": str(SHAPES), "output_dir": str(out), "train.max_steps": 4,
            "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
            "train.learning_rate": 2e-2, "train.warmup_ratio": 0.0, "train.lr_scheduler_type": "constant",
            "train.logging_steps": 1, "train.save_steps": 1000, "train.gradient_checkpointing": False,
            "data.num_workers": 0, "lora.dropout": 0.0, "data.cache": False, "train.report_to": ["none"]}
    base.update(overrides)
    return vlmtune.load_recipe(None, overrides=base)


def dpo_plan(tmp_path, family=FAMILY, **overrides):
    """A plan of method dpo whose train split holds the QUESTIONS pairs (formatted like SFT examples)."""
    sides = {}
    for i, side in enumerate(("chosen", "rejected")):
        path = write_jsonl(tmp_path / f"{side}.jsonl", [_conversation(img, q, r[i]) for img, q, *r in QUESTIONS])
        sides[side] = vlmtune.plan(_recipe(path, tmp_path / "out", family, **overrides))
    chosen, rejected = sides["chosen"], sides["rejected"]
    pairs = [PreferencePair(c, r, c.source) for c, r in zip(chosen.train.examples, rejected.train.examples, strict=True)]
    recipe = dataclasses.replace(chosen.recipe, method="dpo")
    return dataclasses.replace(chosen, recipe=recipe, train=PreparedPairs(pairs=pairs, rows=len(pairs)), eval=None)


def _batch(trainer):
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    return {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _direct_logps(model, batch) -> torch.Tensor:
    """Sum of log-softmax over the supervised tokens, from the model's own logits (per row)."""
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "real_tokens", "bad_samples")}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def _sft_batch(plan, examples, device) -> dict:
    """The examples batched as SFT batches them (the family's collator), labels as a completion mask."""
    from vlmtune.data.collator import collator_for
    from vlmtune.data.dataset import to_dataset

    ds = to_dataset(examples, plan.family, plan.processor, plan.model_config)
    pad = plan.processor.tokenizer.pad_token_id
    batch = collator_for(plan.family, pad if pad is not None else 0)([ds[i] for i in range(len(ds))])
    batch["completion_mask"] = (batch.pop("labels") != -100).long()
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _trainer_metrics(trainer, batch) -> dict:
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


def test_pair_batch_labels_are_the_replies(tmp_path):
    plan = dpo_plan(tmp_path)
    trainer, _ = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    batch = _batch(trainer)
    tok = plan.processor.tokenizer
    n = len(QUESTIONS)
    assert batch["input_ids"].shape[0] == 2 * n
    for row in range(2 * n):
        kept = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        reply = QUESTIONS[row % n][2 + row // n]
        assert tok.decode(kept).startswith(reply) and tok.decode(kept) != reply  # the reply, then its end token
    grids = batch["image_grid_thw"]
    assert grids.shape[0] == 2 * n and torch.equal(grids[:n], grids[n:])  # each image once per half


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_logps_equal_a_direct_computation_and_no_reference_copy(family, tmp_path):
    plan = dpo_plan(tmp_path, family)
    trainer, _ = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled
    base_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    fresh = plan.family.load_class().from_pretrained(plan.model_path)
    assert base_params == sum(p.numel() for p in fresh.parameters())  # one copy of the base weights
    # TRL keeps the adapter's initial weights as a frozen "ref" adapter (zero B: the base model itself)
    assert any(".ref." in n for n, _ in trainer.model.named_parameters())
    with torch.no_grad():  # a non-zero trained adapter, so policy and reference differ
        for n, p in trainer.model.named_parameters():
            if "lora_B.default" in n:
                p.normal_(0, 0.05)
    batch = _batch(trainer)
    got = _trainer_metrics(trainer, batch)
    direct = _direct_logps(trainer.model, batch)
    n = len(QUESTIONS)
    assert got["logps/chosen"] == pytest.approx(direct[:n].mean().item(), rel=1e-4, abs=1e-4)
    assert got["logps/rejected"] == pytest.approx(direct[n:].mean().item(), rel=1e-4, abs=1e-4)
    for half, side in ((slice(None, n), "chosen"), (slice(n, None), "rejected")):  # each half: its examples alone
        alone = _sft_batch(plan, [getattr(p, side) for p in plan.train.pairs], trainer.model.device)
        assert torch.allclose(direct[half], _direct_logps(trainer.model, alone), rtol=1e-4, atol=1e-3)
    with trainer.model.disable_adapter():
        ref = _direct_logps(trainer.model, batch)
    beta = plan.recipe.dpo.beta
    assert got["rewards/chosen"] == pytest.approx(beta * (direct[:n] - ref[:n]).mean().item(), rel=1e-3, abs=1e-4)


SETUPS = {"bf16-lora": {"model.dtype": "bfloat16"},
          "4bit-qlora": {"model.dtype": "bfloat16", "quantization.mode": "4bit", "quantization.compute_dtype": "bfloat16"}}


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_steps_raise_the_margin_change_only_lora_and_merge(setup, tmp_path):
    if setup == "4bit-qlora":
        pytest.importorskip("bitsandbytes")
    plan = dpo_plan(tmp_path, **SETUPS[setup])
    trainer, report = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    assert report["language"][0] > 0 and report["vision"][0] == 0
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(logged) == 4 and {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(logged[0])
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # fresh adapter: policy == reference
    margin = _trainer_metrics(trainer, _batch(trainer))["rewards/margins"]
    assert margin > 0.05
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach().float())}
    assert changed and all("lora_" in n for n in changed)
    if setup != "bf16-lora":
        return
    from vlmtune.training import write_outputs

    out = tmp_path / "adapter"
    out.mkdir()
    write_outputs(trainer, plan, out, {"global_step": trainer.state.global_step})
    meta = json.loads((out / "vlmtune.json").read_text())
    assert meta["method"] == "dpo" and (out / "adapter_model.safetensors").is_file()
    vlmtune.merge_adapter(out, tmp_path / "merged", log=lambda *_: None, progress=False)  # its parity check passes
    image = str(SHAPES / QUESTIONS[0][0])
    reply = vlmtune.predict(str(tmp_path / "merged"), images=[image], prompt=QUESTIONS[0][1], max_new_tokens=4,
                            progress=False)
    assert isinstance(reply[0]["prediction"], str)



@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_raises_the_margin_in_a_few_steps(family, tmp_path):
    """fp32 LoRA, 3 steps on the four pairs: the chosen-minus-rejected margin rises from 0 and only LoRA moves."""
    plan = dpo_plan(tmp_path, family, **{"model.dtype": "float32", "train.max_steps": 3,
                                         "train.learning_rate": 5e-3})
    trainer, _ = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    first = next(h for h in trainer.state.log_history if "rewards/margins" in h)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert _trainer_metrics(trainer, _batch(trainer))["rewards/margins"] > 0.01
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)

@pytest.mark.parametrize("setup", ["fp32-lora", "4bit-qlora"])
def test_starting_from_an_sft_adapter(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    from vlmtune.config.schema import LoraConfig as RecipeLora
    from vlmtune.modeling import lora_targets

    if setup == "4bit-qlora":
        pytest.importorskip("bitsandbytes")
    plan = dpo_plan(tmp_path, **SETUPS.get(setup, {}))
    base = plan.family.load_class().from_pretrained(plan.model_path)
    torch.manual_seed(1)
    sft = get_peft_model(base, LoraConfig(r=4, target_modules=lora_targets(base, plan.family, RecipeLora()),
                                          init_lora_weights=False))
    folder = tmp_path / "my-sft"
    sft.save_pretrained(folder)
    saved = {n: p.detach().clone() for n, p in sft.named_parameters() if "lora_" in n}
    (folder / "vlmtune.json").write_text(json.dumps({"base_model": "builtin:somewhere-else"}))
    wrong = dataclasses.replace(plan, recipe=dataclasses.replace(
        plan.recipe, dpo=dataclasses.replace(plan.recipe.dpo, init_adapter=str(folder))))
    with pytest.raises(vlmtune.VlmtuneError, match="was trained on builtin:somewhere-else"):
        build_trainer(wrong, tmp_path / "ckpt", log=lambda *_: None)
    (folder / "vlmtune.json").write_text(json.dumps({"base_model": plan.recipe.model.name_or_path}))
    trainer, _ = build_trainer(wrong, tmp_path / "ckpt", log=lambda *_: None)
    params = dict(trainer.model.named_parameters())
    # it starts where the SFT adapter ended (TRL keeps QLoRA's adapter weights in bf16)
    assert all(torch.equal(params[n], p.to(params[n].dtype)) for n, p in saved.items())
    assert all(params[n].requires_grad for n in saved)
    ref = {n: p.detach().clone() for n, p in params.items() if ".ref." in n}
    assert ref and not any(p.requires_grad for n, p in params.items() if ".ref." in n)  # the SFT adapter: reference
    trainer.args.max_steps = 2
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], p.to(params[n].dtype)) for n, p in saved.items())
    assert all(torch.equal(params[n], p) for n, p in ref.items())


def test_every_method_validates_its_section_and_refuses_bad_values(tmp_path):
    from vlmtune import methods

    data = write_jsonl(tmp_path / "d.jsonl", [_conversation(*QUESTIONS[0][:3])])
    for name, method in methods.METHODS.items():
        assert method.name == name and methods.get(name) is method
        recipe = _recipe(data, tmp_path / "o")
        if method.section is not None:
            assert isinstance(method.settings(recipe), method.section)
        assert method.validate(recipe, check_paths=False) == []
    with pytest.raises(ValueError, match="known: sft, dpo"):
        methods.get("ppo")
    with pytest.raises(vlmtune.RecipeError) as e:
        _recipe(data, tmp_path / "o", method="dpo", **{"dpo.loss_type": "sigmoidd", "dpo.beta": 0,
                                                        "train.packing": True})
    text = str(e.value)
    for field in ("dpo.loss_type", "dpo.beta", "train.packing", "data.format"):
        assert field in text
    assert "ipo" in text  # the installed TRL's losses are listed
    with pytest.raises(vlmtune.RecipeError, match="method: must be one of sft, dpo"):
        _recipe(data, tmp_path / "o", method="sfft")


def test_sft_weight_adds_trl_sft_term(tmp_path):
    from vlmtune import methods

    recipe = _recipe(write_jsonl(tmp_path / "d.jsonl", [_conversation(*QUESTIONS[0][:3])]), tmp_path / "o",
                     **{"dpo.sft_weight": 0.5, "dpo.loss_type": "ipo"})
    seen = {}
    methods.get("dpo").trainer_args(lambda cls, **kw: seen.update(kw), recipe)
    assert seen["loss_type"] == ["ipo", "sft"] and seen["loss_weights"] == [1.0, 0.5]
    assert seen["beta"] == recipe.dpo.beta


def test_commands_name_the_method_and_refuse_another(tmp_path):
    from vlmtune.cli import _recipe, build_parser

    recipe = ROOT / "recipes" / "tiny-dpo.yaml"
    for command, method in (("train", "dpo"), ("dpo", "dpo")):
        args = build_parser().parse_args([command, str(recipe)])
        assert _recipe(args).method == method
    with pytest.raises(vlmtune.RecipeError, match="`vlmtune sft` trains sft: run `vlmtune train"):
        _recipe(build_parser().parse_args(["sft", str(recipe)]))
    sft = ROOT / "recipes" / "tiny-demo.yaml"
    assert _recipe(build_parser().parse_args(["train", str(sft)])).method == "sft"
    with pytest.raises(vlmtune.RecipeError, match="data.format"):  # SFT rows are no preference pairs
        _recipe(build_parser().parse_args(["dpo", str(sft)]))


def test_demo_pairs_are_the_shipped_ones_and_differ_in_one_fact(tmp_path):
    import shutil

    from vlmtune.demo.pairs import make_shapes_pairs

    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(SHAPES / name, tmp_path / name)
    for path in make_shapes_pairs(tmp_path):
        assert path.read_text() == (SHAPES / path.name).read_text()
    rows = [json.loads(line) for line in (tmp_path / "preference-train.jsonl").read_text().splitlines()]
    for row in rows:
        diff = set(row["chosen"].split()) ^ set(row["rejected"].split())
        assert row["chosen"] != row["rejected"] and 1 <= len(diff) <= 6  # "There is 1 shape." / "There are 2 shapes."


@pytest.mark.slow
def test_train_runs_the_dpo_recipe_end_to_end(tmp_path):
    rows = (SHAPES / "preference-train.jsonl").read_text().splitlines()[:8]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = vlmtune.load_recipe(ROOT / "recipes" / "tiny-dpo.yaml", overrides={
        "data.train": str(data), "data.eval": None, "output_dir": str(tmp_path / "run"), "train.max_steps": 2,
        "train.per_device_train_batch_size": 4, "data.num_workers": 0, "train.report_to": ["none"]})
    result = vlmtune.train(recipe, log=lambda *_: None)
    meta = json.loads((result.output_dir / "vlmtune.json").read_text())
    results = json.loads((result.output_dir / "train_results.json").read_text())
    assert meta["method"] == "dpo" and result.metrics["global_step"] == 2
    assert results["train_examples"] == 8 and results["train_supervised_tokens_per_epoch"] > 0
    assert (result.output_dir / "adapter_model.safetensors").is_file()
