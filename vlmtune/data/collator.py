"""Batches examples: right padding, vision tensors concatenated along dim 0. Knows no family: the family says
which processor outputs are concatenated (`concat_keys`) and which are per-token (`token_keys`, padded like
the ids with 0).

Processors that tile (anyres, image splitting) give each image a different number of tiles: every
dimension but the first is zero-padded to the batch maximum; the models read each image's real tile
count from their own size outputs and ignore the padding.

Rows whose vision features come from the vision cache (vision_cache.py) carry `encoder_outputs` instead of
pixels: the batch gets them combined, in row order, as the model's `mm_encoder_outputs` (`Family.combine_encoder_outputs`).

Rows the dataset marked `bad_sample` (media that failed to load) are dropped and listed under
`bad_samples` for the trainer to count. A batch whose every row failed becomes one padding token with no
label: the step still runs forward and backward, with a loss of zero (no supervised token), so gradient
accumulation and every rank's collectives (DDP, ZeRO-3) stay in step; re-drawing other rows here is not
possible (a collator sees only its own rows) and would change the data order a resumed run replays.
"""

from __future__ import annotations

import torch

from .formatting import IGNORE_INDEX


class VisionCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 concat_keys: tuple[str, ...] = ("pixel_values",), token_keys: tuple[str, ...] = (),
                 combine=None):
        self.combine = combine  # Family.combine_encoder_outputs: rows with cached vision features
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.concat_keys = concat_keys
        self.token_keys = token_keys

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        bad = [f["bad_sample"] for f in features if f.get("bad_sample")]
        features = [f for f in features if not f.get("bad_sample")] or [self._placeholder()]
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
        for key in self.concat_keys:
            parts = [f[key] for f in features if f.get(key) is not None]
            if parts:
                batch[key] = concat_padded(parts)
        for key in self.token_keys:
            if any(f.get(key) is not None for f in features):
                values = torch.zeros((n, length), dtype=torch.long)
                for i, f in enumerate(features):
                    if f.get(key) is not None:
                        values[i, :len(f[key])] = f[key]
                batch[key] = values
        cached = [f["encoder_outputs"] for f in features if f.get("encoder_outputs")]
        if cached:
            batch["mm_encoder_outputs"] = encoder_outputs(cached, self.combine)
        if bad:
            batch["bad_samples"] = bad
        return batch

    def _placeholder(self) -> dict[str, torch.Tensor]:
        """A one-token row that supervises nothing: the stand-in for a batch whose every row failed."""
        return {"input_ids": torch.tensor([self.pad_token_id]), "labels": torch.tensor([IGNORE_INDEX])}


class EncoderOutput(dict):
    """Cached outputs of get_image_features (get_video_features), read by the model as attributes
    (`out.pooler_output`); a dict, so the DataLoader and Trainer move its tensors like any batch value."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_tuple(self) -> tuple:  # a model output holding it converts it as it converts its own outputs
        return tuple(self.values())


def encoder_outputs(parts: list[dict], combine) -> dict[str, EncoderOutput]:
    """`mm_encoder_outputs` of a batch from its examples' cached outputs ({"image": {name: value}, "video": ...}),
    in batch order; `combine`: the family's rule joining one output across examples."""
    out = {}
    for kind in ("image", "video"):
        own = [p[kind] for p in parts if kind in p]
        if own:
            out[kind] = EncoderOutput({name: combine([o[name] for o in own]) for name in own[0]})
    return out


def concat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding every other dimension to the largest size among the parts."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            grown = p.new_zeros((p.shape[0], *shape))
            grown[(slice(None), *(slice(0, n) for n in p.shape[1:]))] = p
            p = grown
        padded.append(p)
    return torch.cat(padded, dim=0)


def collator_for(family, pad_token_id: int, pad_to_multiple_of: int | None = None) -> VisionCollator:
    """The collator for one family's examples (its concatenated and per-token keys)."""
    return VisionCollator(pad_token_id, pad_to_multiple_of, family.concat_keys, family.token_keys,
                          combine=family.combine_encoder_outputs)
