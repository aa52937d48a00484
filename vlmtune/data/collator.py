"""Batches examples: right padding, vision tensors concatenated along dim 0. Knows no family."""

from __future__ import annotations

import torch

from .formatting import IGNORE_INDEX

CONCAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class VisionCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        has_positions = "position_ids" in features[0]
        if has_positions:
            rows = features[0]["position_ids"].shape[0]
            position_ids = torch.zeros((rows, n, length), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = f["input_ids"]
            labels[i, :k] = f["labels"]
            attention_mask[i, :k] = 1
            if has_positions:
                position_ids[:, i, :k] = f["position_ids"]
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if has_positions:
            batch["position_ids"] = position_ids
        for key in CONCAT_KEYS:
            parts = [f[key] for f in features if f.get(key) is not None]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        return batch
