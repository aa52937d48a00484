"""The logged num_tokens is the examples' tokens, packed or not, whichever loss runs (TRL 1.16 counts a packed
batch's position_ids.size(1): one row with its fill, or the number of rows under M-RoPE)."""

from __future__ import annotations

import pytest
import torch

import vlmtune
from vlmtune.token_count import REAL_TOKENS, CountingCollator
from vlmtune.training import build_trainer

from .test_training import SHAPES, recipe_for


@pytest.mark.parametrize("labels_only", [True, False], ids=["label-loss", "trl-loss"])
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_logged_num_tokens_are_the_examples_tokens(tmp_path, packing, labels_only):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join((SHAPES / "train.jsonl").read_text().splitlines()[:10]) + "\n")
    recipe = recipe_for("qwen2_vl", data, tmp_path, **{
        "train.packing": packing, "data.max_length": 120, "train.per_device_train_batch_size": 2 if packing else 3,
        "train.max_steps": -1, "train.num_train_epochs": 1, "train.loss_on_labels_only": labels_only,
        "train.gradient_checkpointing": False})
    plan = vlmtune.plan(recipe)
    trainer, _ = build_trainer(plan, tmp_path / "ckpt", log=lambda *_: None)
    if packing:  # rows of a batch differ in length: the shorter ones are filled
        bins = trainer.train_dataset.bins
        lengths = [len(e.input_ids) for e in plan.train.examples]
        assert len({sum(lengths[i] for i in b) for b in bins}) > 1 and len(bins) < len(lengths)
    trainer.train()
    logged = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    assert len(logged) == trainer.state.global_step > 1
    assert logged[-1] == plan.train.num_tokens == sum(len(e.input_ids) for e in plan.train.examples)


def test_failed_samples_and_their_placeholder_count_nothing():
    seen = []

    def collate(features):
        seen.append(features)
        return {"input_ids": torch.zeros((1, 1), dtype=torch.long)}

    count = CountingCollator(collate)
    rows = [{"input_ids": torch.ones(5)}, {"input_ids": torch.ones(7), "bad_sample": {"source": "d.jsonl:2"}}]
    assert int(count(rows)[REAL_TOKENS]) == 5
    assert int(count([{"pack": rows}, {"pack": [{"input_ids": torch.ones(3)}]}])[REAL_TOKENS]) == 8
    assert int(count([rows[1]])[REAL_TOKENS]) == 0
    assert seen[0] is rows  # the wrapped collator gets the features unchanged
