"""The logged `num_tokens`: the tokens of the examples trained on, with padding and packing fill left out.

TRL 1.16's SFTTrainer counts `attention_mask.sum()` when a batch has a mask, else `position_ids.size(1)`: for a
packed batch (no mask) that is one row's length, fill included, and with M-RoPE position ids (rows, batch,
length) it is the number of rows. So the trainer's collator is wrapped: each batch states its examples' token
count under `REAL_TOKENS` (samples that failed to load, and the placeholder standing in for them, count none),
and the trainer logs that count, whichever loss runs."""

from __future__ import annotations

import torch

REAL_TOKENS = "real_tokens"  # not a model input: the trainer takes it out before the forward


class CountingCollator:
    """`collate`'s batch with the count of its examples' tokens (rows or packs of rows alike)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        if REAL_TOKENS in batch:  # a collator whose rows are not examples (preference pairs) states its own count
            return batch
        rows = [r for f in features for r in (f["pack"] if "pack" in f else [f]) if not r.get("bad_sample")]
        batch[REAL_TOKENS] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        return batch


class TokenCount:
    """Trainer mixin (first in the bases): logs num_tokens from the batch's `REAL_TOKENS`, replacing the count
    the SFTTrainer's (or LabelOnlyLoss's) compute_loss just added."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        count = inputs.pop(REAL_TOKENS, None)
        before = self._total_train_tokens
        out = super().compute_loss(model, inputs, *args, **kwargs)
        if count is not None and self.model.training:  # every rank, every micro-batch: the gather is collective
            count = torch.as_tensor(count, device=inputs["input_ids"].device).reshape(1)
            self._total_train_tokens = before + self.accelerator.gather_for_metrics(count).sum().item() // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return out
