"""Prepared examples as a `datasets.Dataset` whose on-access transform decodes and processes images and videos.

The transform runs where rows are fetched, i.e. inside the DataLoader workers, so image and video
work overlaps the training step instead of running serially inside it. A row whose media cannot be
decoded, or no longer match what preparation planned, raises BadSample; with `mark_bad` the row is
returned as `bad_sample: {"source", "reason"}` instead, for the collator to drop and the trainer to count
(workers are separate processes: what they find travels in the batch).

With the vision cache (vision_cache.py) a row's media are not decoded at all: its stored encoder outputs and the
processor outputs the model still reads (grids, sizes) come from the cache instead.
"""

from __future__ import annotations

import datasets
import torch

from ..errors import VlmtuneError
from ..families import Family
from . import video
from .images import ImageProblem, load_rgb
from .prepare import Example


class BadSample(VlmtuneError):
    """A prepared row that fails when its media are loaded: undecodable, or changed since preparation."""

    def __init__(self, source: str, reason: str, hint: str = ""):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}{hint}")


DECODE_HINT = "; fix or remove the file (`vlmtune validate --decode` finds every such file)"


def to_dataset(examples: list[Example], family: Family, processor, model_config=None,
               mark_bad: bool = False, features=None, feature_keys: list[str | None] | None = None) -> datasets.Dataset:
    """`model_config`: needed where the family's video positions depend on it (Qwen2.5-VL's tokens_per_second).

    `mark_bad`: a row that fails to load becomes a `bad_sample` marker instead of raising BadSample.
    `features`: key -> cached vision entry, {"problem": reason} or None (vision_cache_prepass.CacheReader), each
    example's key in `feature_keys`: rows then carry `encoder_outputs` instead of pixels."""
    columns = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "images": [e.images for e in examples],
        "grids": [[list(g) for g in e.grids] for e in examples],
        "source": [e.source for e in examples],
        "max_pixels": [e.max_pixels for e in examples],
        "videos": [video.dumps(e.videos) for e in examples],
    }
    if features is not None:
        columns["feature_key"] = list(feature_keys)
    table = datasets.Dataset.from_dict(columns)
    return table.with_transform(VisionTransform(family, processor, model_config, mark_bad, features))


def _load(path: str, source: str):
    """Decode one image; a file whose header read fine but whose pixels do not names its data row."""
    try:
        return load_rgb(path)
    except ImageProblem as e:
        raise BadSample(source, str(e), DECODE_HINT) from None


class VisionTransform:
    """Batch of stored rows -> model inputs per row (tensors; vision keys None for text-only rows)."""

    def __init__(self, family: Family, processor, model_config=None, mark_bad: bool = False, features=None):
        self.features = features
        self.family = family
        self.processor = processor
        self.model_config = model_config
        self.mark_bad = mark_bad

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = []
        keys = batch.get("feature_key") or [None] * len(batch["input_ids"])
        for ids, labels, images, grids, source, max_pixels, videos, key in zip(
                batch["input_ids"], batch["labels"], batch["images"], batch["grids"], batch["source"],
                batch["max_pixels"], batch["videos"], keys, strict=True):
            try:
                rows.append(self._row(ids, labels, images, grids, source, max_pixels, videos, key))
            except BadSample as e:
                if not self.mark_bad:
                    raise
                rows.append({"bad_sample": {"source": e.source, "reason": e.reason}})
        keys = {k for row in rows for k in row}
        if self.family.position_ids is not None:
            keys.add("position_ids")
        if self.mark_bad:
            keys.add("bad_sample")
        return {key: [row.get(key) for row in rows] for key in keys}

    def _row(self, ids, labels, images, grids, source, max_pixels, videos, key=None) -> dict:
        input_ids = torch.tensor(ids, dtype=torch.long)
        row = {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.long)}
        clips = video.loads(videos)
        if self.features is not None and (images or clips):
            row.update(self._cached(key, source))
        elif images:
            vision = self.family.image_inputs(self.processor, [_load(p, source) for p in images],
                                              self._bounds(max_pixels))
            made = self.family.made_grids(vision) if self.family.made_grids else None
            if made is not None and made != [list(g) for g in grids]:
                raise BadSample(source, f"the image processor made grids {made} but {grids} were planned; "
                                        "did an image file change after the data was prepared?")
            row.update(vision)
        if clips and self.features is None:
            row.update(self._videos(clips, source))
        if self.family.position_ids is not None:
            extra = {"videos": [(c.grid, self._time_step(c)) for c in clips]} if clips else {}
            row["position_ids"] = self.family.position_ids(input_ids, grids, self.processor, **extra)
        if self.family.token_inputs is not None:
            for key, values in self.family.token_inputs(self.processor, ids).items():
                row[key] = torch.tensor(values, dtype=torch.long)
        return row

    def _cached(self, key: str | None, source: str) -> dict:
        """The row's vision inputs from the vision cache: `encoder_outputs` and the non-pixel processor outputs."""
        entry = self.features(key) if key else None
        if entry is None:
            raise BadSample(source, "its vision features are missing from the vision cache (the entry was damaged "
                                    "since the cache was built); the next run rebuilds it")
        if "problem" in entry:  # its media failed when the cache was built
            raise BadSample(source, entry["problem"])
        return {**entry["inputs"], "encoder_outputs": entry["outputs"]}

    def _videos(self, clips: list[video.VideoClip], source: str) -> dict:
        """One sample's videos through the video processor, as the sampled frames planned."""
        try:
            frames = [video.load_frames(c) for c in clips]
        except ImageProblem as e:  # VideoProblem: a file that reads its header but not its frames
            raise BadSample(source, str(e)) from None
        if self.family.video_inputs is not None:
            made = self.family.video_inputs(self.processor, frames, clips)
        else:
            made = dict(self.processor.video_processor(videos=frames, return_tensors="pt"))
        grids = self.family.made_video_grids(made) if self.family.made_video_grids else None
        if grids is not None and grids != [list(c.grid) for c in clips]:
            raise BadSample(source, f"the video processor made grids {grids} but "
                                    f"{[list(c.grid) for c in clips]} were planned; did a video file change after "
                                    "the data was prepared?")
        return made

    def _time_step(self, clip: video.VideoClip) -> float:
        rule = self.family.video_time_step
        return 1.0 if rule is None else rule(self.model_config, clip.seconds_per_grid)

    def _bounds(self, max_pixels: int | None) -> dict:
        """A sample shrunk to fit max_length is processed under its own, lower pixel bound."""
        if max_pixels is None or self.family.pixels is None:
            return {}
        return self.family.pixels.call_kwargs(self.processor.image_processor, max_pixels)
