"""Contrastive LoRA on the tiny CLIP / SigLIP: the losses, negatives gathered across processes, recall@k, a short
run that raises recall and changes only what it trains, the adapter folder, base-vs-adapter recall, merge."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmtune.config import RecipeError, load_recipe
from vlmtune.contrastive.losses import contrastive_loss
from vlmtune.contrastive.pairs import make_shape_captions
from vlmtune.contrastive.recall import recall_at_k
from vlmtune.embedding import embed_images, embed_texts, load_embedding_model, registry

FAMILIES = [f.name for f in registry.all_families()]


def _batch(n=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g), dim=-1), F.normalize(torch.randn(n, dim, generator=g), dim=-1))


def test_infonce_is_the_mean_of_both_cross_entropies_written_out():
    images, texts = _batch()
    scale = torch.tensor(2.0)
    s = scale.exp()
    total = 0.0
    for i in range(len(images)):
        row = s * torch.stack([images[i] @ t for t in texts])
        col = s * torch.stack([texts[i] @ im for im in images])
        total += -(row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    assert torch.allclose(contrastive_loss("infonce", images, texts, scale), total / (2 * len(images)), atol=1e-5)


def test_sigmoid_loss_is_every_pair_written_out():
    images, texts = _batch()
    scale, bias = torch.tensor(1.5), torch.tensor(-3.0)
    total = 0.0
    for i in range(len(images)):
        for j in range(len(texts)):
            z = 1.0 if i == j else -1.0
            total += -F.logsigmoid(z * (scale.exp() * images[i] @ texts[j] + bias))
    assert torch.allclose(contrastive_loss("sigmoid", images, texts, scale, bias), total / len(images), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_familys_loss_is_its_models_own(family):
    """contrastive_loss with the family's loss equals what CLIPModel / SiglipModel compute with return_loss."""
    from PIL import Image

    from vlmtune.embedding import image_features, image_inputs, text_features, text_inputs

    model, processor, fam = load_embedding_model(f"builtin:{registry.get(family).tiny_name}")
    images = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    inputs = image_inputs(processor, images) | text_inputs(processor, fam, ["a red one", "green", "a blue square"])
    with torch.no_grad():
        own = model(**inputs, return_loss=True).loss
        ours = contrastive_loss(fam.loss, image_features(model, inputs["pixel_values"]),
                                text_features(model, inputs["input_ids"], inputs.get("attention_mask")),
                                model.logit_scale, getattr(model, "logit_bias", None))
    assert torch.allclose(own, ours, atol=1e-5)


def test_negatives_gathered_over_two_processes_give_the_whole_batch_loss_and_gradients(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from tests import contrastive_gather_worker as worker

    out = tmp_path / "gathered.json"
    mp.spawn(worker.run, args=(2, port, str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    for kind in ("infonce", "sigmoid"):
        images, texts, scale, bias = worker.leaves()
        loss = contrastive_loss(kind, images, texts, scale, bias)
        loss.backward()
        assert got[kind]["loss"] == pytest.approx(float(loss), abs=1e-5)
        for g, w in zip(got[kind]["grads"], worker.grads(images, texts, scale, bias), strict=True):
            np.testing.assert_allclose(np.array(g), w.numpy(), atol=1e-5)
    assert got["infonce"]["grads"][1] != got["sigmoid"]["grads"][1]


def test_recall_counts_any_caption_of_an_image_and_ties_against():
    images = np.eye(3, dtype="float32")
    texts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]], dtype="float32")  # image 2 has two captions
    owner = np.array([0, 1, 1, 2])
    r = recall_at_k(images, texts, owner, ks=(1, 2))
    assert r["i2t_r@1"] == pytest.approx(2 / 3)  # image 1's best text (row 2) is its own; image 2's ties with 1's
    assert r["t2i_r@1"] == pytest.approx(3 / 4)  # caption 1 scores 0 with its image and with image 0: a tie
    assert recall_at_k(np.ones((3, 3)), np.ones((4, 3)), owner, ks=(1,))["i2t_r@1"] == 0.0


def _trained_layer(name: str) -> bool:
    return bool(re.search(r"\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$", name))


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory):
    return make_shape_captions(tmp_path_factory.mktemp("pairs"))


def _recipe(family, data, out, **train):
    train = {"max_steps": 30, "per_device_train_batch_size": 12, "gradient_accumulation_steps": 1,
             "learning_rate": 5e-3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "logging_steps": 10,
             "report_to": ["none"], **train}
    return load_recipe(None, {
        "method": "contrastive", "model.name_or_path": f"builtin:{registry.get(family).tiny_name}",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "format": "caption"},
        "train": train, "output_dir": str(out)})  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_run_raises_recall_and_changes_only_what_it_trains(family, shapes_pairs, tmp_path):
    from vlmtune.contrastive.evaluate import contrastive_recall
    from vlmtune.contrastive.merge import merge_contrastive
    from vlmtune.contrastive.train import train_contrastive

    out = train_contrastive(_recipe(family, shapes_pairs, tmp_path / "run", eval_steps=15), log=lambda *a: None)
    results = json.loads((out / "train_results.json").read_text())
    assert [h["step"] for h in results["recall_history"]] == [15, 30]  # during training, the last one is final
    meta = json.loads((out / "vlmtune.json").read_text())
    assert meta["method"] == "contrastive" and meta["family"] == family
    assert sorted(p.name for p in out.iterdir()) == meta["files"]
    assert results["recall"]["i2t_r@1"] > results["recall_before"]["i2t_r@1"] + 0.1
    assert results["recall"]["t2i_r@1"] > results["recall_before"]["t2i_r@1"] + 0.1
    side = contrastive_recall(out)
    assert side["adapter"] == pytest.approx(results["recall"]) and side["base"] == pytest.approx(results["recall_before"])

    merged = merge_contrastive(out, tmp_path / "merged", log=lambda *a: None)
    from transformers import AutoModel

    base, _, fam = load_embedding_model(f"builtin:{registry.get(family).tiny_name}")
    after = AutoModel.from_pretrained(merged).state_dict()
    changed = {n for n, w in base.state_dict().items() if not torch.equal(w, after[n])}
    projections = tuple(fam.projections.values())
    allowed = {n for n in changed if _trained_layer(n) or n.startswith(projections) or n in fam.temperature}
    assert changed == allowed, f"frozen weights changed: {sorted(changed - allowed)[:5]}"
    assert any(_trained_layer(n) for n in changed) and set(fam.temperature) <= changed
    assert any(n.startswith(projections[0]) for n in changed) and any(n.startswith(projections[1]) for n in changed)
    images = [shapes_pairs / "images" / "eval_0000.png"]
    adapter_model, processor, _ = load_embedding_model(out)
    merged_model, _, _ = load_embedding_model(merged)
    for embed, items in ((embed_images, images), (embed_texts, ["a red circle"])):
        np.testing.assert_allclose(embed(adapter_model, processor, items), embed(merged_model, processor, items),
                                   atol=1e-5)


def test_towers_vision_trains_no_text_weight(shapes_pairs, tmp_path):
    from vlmtune.contrastive.train import build_run

    r = _recipe("clip", shapes_pairs, tmp_path / "run")
    r.lora.towers = "vision"
    run = build_run(r, tmp_path, log=lambda *a: None)
    names = [n for n, p in run.peft_model.named_parameters() if p.requires_grad]
    assert names and not [n for n in names if "text_model" in n or "text_projection" in n]
    assert any("vision_model" in n and "lora_" in n for n in names) and any("visual_projection" in n for n in names)
    assert any(n.endswith("logit_scale") for n in names)


def test_recipe_errors_name_each_field(tmp_path):
    """The contrastive section and lora.towers are fields of the one recipe: every problem at once, by field."""
    with pytest.raises(RecipeError) as e:
        load_recipe(None, {"method": "contrastive", "model": {"name_or_path": "builtin:tiny-clip", "family": "qwen2_vl"},
                           "lora": {"towers": "all"}, "data": {"train": "x", "format": "messages"},
                           "train": {"eval_metrics": ["exact_match"]},
                           "contrastive": {"loss": "triplet", "gather": "yes", "eval_batch_size": 0, "temp": 1}},
                    check_paths=False)
    lines = str(e.value).splitlines()[1:]
    fields = {line.strip().removeprefix("- ").split(":")[0] for line in lines}
    assert fields == {"model.family", "lora.towers", "data.format", "contrastive.loss", "contrastive.gather",
                      "contrastive.eval_batch_size", "contrastive.temp", "train.eval_metrics"}, lines
    assert "clip, siglip" in str(e.value)  # model.family lists the dual-encoder families
    with pytest.raises(RecipeError, match="lora.towers: applies to method contrastive"):
        load_recipe(None, {"model.name_or_path": "a/b", "data.train": "x", "lora.towers": "vision"},
                    check_paths=False)


@pytest.mark.slow
def test_qlora_trains_lora_over_4bit_towers(shapes_pairs, tmp_path):
    """quantization.mode 4bit: the towers' linear layers load as bitsandbytes Linear4bit (the projections stay
    full), a few steps lower the loss, and only LoRA, projections and logit_scale train."""
    import bitsandbytes as bnb

    from vlmtune.contrastive.train import build_run

    r = _recipe("clip", shapes_pairs, tmp_path / "run", max_steps=6, logging_steps=1)
    r.quantization.mode = "4bit"
    run = build_run(r, tmp_path / "work", log=lambda *a: None)
    base = run.peft_model.get_base_model()
    assert isinstance(base.vision_model.encoder.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert not isinstance(base.visual_projection.original_module, bnb.nn.Linear4bit)
    names = [n for n, p in run.peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "projection" in n or n.endswith("logit_scale") for n in names)
    run.trainer.train()
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and np.isfinite(losses).all() and np.mean(losses[-2:]) < np.mean(losses[:2])
