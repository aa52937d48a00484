"""Prepared examples as a `datasets.Dataset` whose on-access transform decodes and processes images and videos.

The transform runs where rows are fetched, i.e. inside the DataLoader workers, so image and video
work overlaps the training step instead of running serially inside it.
"""

from __future__ import annotations

import datasets
import torch

from ..errors import VlmtuneError
from ..families import Family
from . import pixels, video
from .images import ImageProblem, load_rgb
from .prepare import Example


def to_dataset(examples: list[Example], family: Family, processor, model_config=None) -> datasets.Dataset:
    """`model_config`: needed where the family's video positions depend on it (Qwen2.5-VL's tokens_per_second)."""
    table = datasets.Dataset.from_dict({
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "images": [e.images for e in examples],
        "grids": [[list(g) for g in e.grids] for e in examples],
        "source": [e.source for e in examples],
        "max_pixels": [e.max_pixels for e in examples],
        "videos": [video.dumps(e.videos) for e in examples],
    })
    return table.with_transform(VisionTransform(family, processor, model_config))


def _load(path: str, source: str):
    """Decode one image; a file whose header read fine but whose pixels do not names its data row."""
    try:
        return load_rgb(path)
    except ImageProblem as e:
        raise VlmtuneError(f"{source}: {e}; fix or remove the file (`vlmtune validate --decode` finds every such file)") from None


class VisionTransform:
    """Batch of stored rows -> model inputs per row (tensors; vision keys None for text-only rows)."""

    def __init__(self, family: Family, processor, model_config=None):
        self.family = family
        self.processor = processor
        self.model_config = model_config

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        vision_keys: set[str] = set()
        per_row_vision = []
        for ids, labels, images, grids, source, max_pixels, videos in zip(
                batch["input_ids"], batch["labels"], batch["images"], batch["grids"], batch["source"],
                batch["max_pixels"], batch["videos"], strict=True):
            input_ids = torch.tensor(ids, dtype=torch.long)
            out["input_ids"].append(input_ids)
            out["labels"].append(torch.tensor(labels, dtype=torch.long))
            vision = {}
            if images:
                # one sample's images as one nested list, as the processor groups them (LLaVA-OneVision
                # processes the images of a multi-image sample differently from a lone image)
                vision = dict(self.processor.image_processor(images=[[_load(p, source) for p in images]],
                                                             return_tensors="pt", **self._bounds(max_pixels)))
                made = vision.get(self.family.grid_key) if self.family.grid_key else None
                if made is not None and made.tolist() != [list(g) for g in grids]:
                    raise VlmtuneError(f"{source}: the image processor made grids {made.tolist()} but {grids} "
                                       "were planned; did an image file change after the data was prepared?")
                vision_keys.update(vision)
            clips = video.loads(videos)
            if clips:
                vision.update(self._videos(clips, source))
                vision_keys.update(vision)
            if self.family.position_ids is not None:
                extra = {"videos": [(c.grid, self._time_step(c)) for c in clips]} if clips else {}
                vision["position_ids"] = self.family.position_ids(input_ids, grids, self.processor, **extra)
            per_row_vision.append(vision)
        keys = vision_keys | ({"position_ids"} if self.family.position_ids is not None else set())
        for key in keys:
            out[key] = [v.get(key) for v in per_row_vision]
        return out

    def _videos(self, clips: list[video.VideoClip], source: str) -> dict:
        """One sample's videos through the video processor, as the sampled frames planned."""
        try:
            frames = [video.load_frames(c) for c in clips]
        except ImageProblem as e:  # VideoProblem: a file that reads its header but not its frames
            raise VlmtuneError(f"{source}: {e}") from None
        made = dict(self.processor.video_processor(videos=frames, return_tensors="pt",
                                                   **video.processor_kwargs(self.processor)))
        grids = made.get(self.family.video_grid_key)
        if grids is not None and grids.tolist() != [list(c.grid) for c in clips]:
            raise VlmtuneError(f"{source}: the video processor made grids {grids.tolist()} but "
                               f"{[list(c.grid) for c in clips]} were planned; did a video file change after the "
                               "data was prepared?")
        return made

    def _time_step(self, clip: video.VideoClip) -> float:
        rule = self.family.video_time_step
        return 1.0 if rule is None else rule(self.model_config, clip.seconds_per_grid)

    def _bounds(self, max_pixels: int | None) -> dict:
        """A sample shrunk to fit max_length is processed under its own, lower pixel bound."""
        return pixels.call_kwargs(self.processor.image_processor, max_pixels)
