"""Preference pairs as dataset rows and batches.

A pair row holds its chosen and rejected examples as two model-input rows built by the SFT dataset's transform
(`VisionTransform`): the prompt's media are decoded once and shared by both. The collator gives TRL's DPOTrainer
one batch of 2B rows, the chosen rows first, then the rejected ones in the same order, with the family's vision
inputs (each image twice, once per half) and `completion_mask`: 1 where vlmtune's labels supervise a token (the
reply and its end-of-turn token), never on prompt or image tokens."""

from __future__ import annotations

import datasets
import torch

from ..token_count import REAL_TOKENS
from . import video
from .dataset import BadSample, VisionTransform
from .formatting import IGNORE_INDEX


def to_pair_dataset(pairs, family, processor, model_config=None, mark_bad: bool = False) -> datasets.Dataset:
    """Pairs (objects with `chosen` and `rejected` Examples sharing their media) -> a dataset of pair rows."""
    columns = {
        "chosen_input_ids": [p.chosen.input_ids for p in pairs], "chosen_labels": [p.chosen.labels for p in pairs],
        "rejected_input_ids": [p.rejected.input_ids for p in pairs],
        "rejected_labels": [p.rejected.labels for p in pairs],
        "images": [p.chosen.images for p in pairs], "grids": [[list(g) for g in p.chosen.grids] for p in pairs],
        "source": [p.source for p in pairs], "max_pixels": [p.chosen.max_pixels for p in pairs],
        "videos": [video.dumps(p.chosen.videos) for p in pairs],
    }
    return datasets.Dataset.from_dict(columns).with_transform(PairTransform(family, processor, model_config, mark_bad))


class PairTransform:
    """Batch of stored pair rows -> {"chosen": inputs, "rejected": inputs} per row (or a `bad_sample` marker)."""

    def __init__(self, family, processor, model_config=None, mark_bad: bool = False):
        self.rows = VisionTransform(family, processor, model_config)
        self.mark_bad = mark_bad

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = []
        for i in range(len(batch["source"])):
            try:
                out.append(self._pair(batch, i))
            except BadSample as e:
                if not self.mark_bad:
                    raise
                out.append({"bad_sample": {"source": e.source, "reason": e.reason}})
        keys = {k for row in out for k in row}
        return {k: [row.get(k) for row in out] for k in keys}

    def _pair(self, batch: dict[str, list], i: int) -> dict:
        shared = (batch["images"][i], batch["grids"][i], batch["source"][i], batch["max_pixels"][i])
        chosen = self.rows._row(batch["chosen_input_ids"][i], batch["chosen_labels"][i], *shared, batch["videos"][i])
        if video.loads(batch["videos"][i]):  # video positions need the clips: built in full (frames decoded again)
            rejected = self.rows._row(batch["rejected_input_ids"][i], batch["rejected_labels"][i], *shared,
                                      batch["videos"][i])
        else:  # the same media: ids, labels and positions of its own, the decoded vision inputs of the chosen row
            images, *rest = shared
            rejected = self.rows._row(batch["rejected_input_ids"][i], batch["rejected_labels"][i], [], *rest,
                                      batch["videos"][i])
            rejected = {**{k: v for k, v in chosen.items() if k not in rejected}, **rejected}
        return {"chosen": chosen, "rejected": rejected}


class PreferenceCollator:
    """Pair rows -> one batch of chosen rows then rejected rows, through the family's collator (`collate`)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        bad = [f["bad_sample"] for f in features if f.get("bad_sample")]
        good = [f for f in features if not f.get("bad_sample")]
        rows = [f["chosen"] for f in good] + [f["rejected"] for f in good]
        if not rows:  # every pair failed: one empty pair keeps the step (and every rank's collectives) in step
            empty = {"input_ids": torch.tensor([self.collate.pad_token_id]), "labels": torch.tensor([IGNORE_INDEX])}
            rows = [empty, dict(empty)]
        batch = self.collate(rows)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        batch[REAL_TOKENS] = torch.tensor(sum(len(r["input_ids"]) for r in rows) if good else 0)
        if bad:
            batch["bad_samples"] = bad
        return batch
