"""Map-style dataset over prepared examples; images are decoded and processed here, in DataLoader workers."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..families import Family
from .images import load_rgb
from .prepare import Example


class VisionSFTDataset(Dataset):
    def __init__(self, examples: list[Example], family: Family, processor):
        self.examples = examples
        self.family = family
        self.processor = processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        item = {
            "input_ids": torch.tensor(ex.input_ids, dtype=torch.long),
            "labels": torch.tensor(ex.labels, dtype=torch.long),
        }
        if ex.images:
            vision = self.processor.image_processor(images=[load_rgb(p) for p in ex.images], return_tensors="pt")
            item.update({k: v for k, v in vision.items()})
            grids = vision.get("image_grid_thw")
            if grids is not None and [tuple(g) for g in grids.tolist()] != [tuple(g) for g in ex.grids]:
                raise RuntimeError(f"{ex.source}: the image processor made grids {grids.tolist()} but "
                                   f"{ex.grids} were planned; did an image file change after preparation?")
        if self.family.position_ids is not None:
            item["position_ids"] = self.family.position_ids(item["input_ids"], ex.grids, self.processor)
        return item
