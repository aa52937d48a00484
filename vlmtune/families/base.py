"""What vlmtune needs to know about one model family, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# (processor, height, width) -> (image tokens, vision grid) for an image of that size.
LayoutFn = Callable[[object, int, int], tuple[int, tuple[int, ...]]]
# (input_ids, image grids, processor[, videos=((grid, temporal step), ...)]) -> position ids (rows, seq_len)
# for one unpadded sequence; `videos` is passed only when the sequence has videos.
PositionFn = Callable[..., torch.Tensor]
# (processor, frames, height, width) -> (video tokens, (t, h, w) grid) for a video of that many frames and size.
VideoLayoutFn = Callable[[object, int, int, int], tuple[int, tuple[int, ...]]]
# (model config, seconds one temporal patch covers) -> temporal position step per temporal patch.
VideoTimeFn = Callable[[object, float], float]


@dataclass(frozen=True)
class Family:
    """A model family: module layout, chat-format facts and defaults.

    Generic code asks the family; it never tests a model name.
    """

    name: str
    model_types: tuple[str, ...]
    description: str
    vision_prefix: str
    projector_prefix: str
    language_prefix: str
    image_token: str
    end_of_turn: tuple[str, ...]
    default_lora_targets: tuple[str, ...]
    append_eos_after_reply: bool = False
    fp16_overflows: bool = False
    # Module path prefixes kept out of 4-bit/8-bit quantization (matched from the start of the path).
    skip_quantization: tuple[str, ...] = ()
    image_layout: LayoutFn | None = None
    position_ids: PositionFn | None = None  # None: the model's default 1-D positions
    # Key of the image processor's output that must equal the planned grids (None: nothing to check).
    grid_key: str | None = "image_grid_thw"
    # Image tokens per image when a sample holds several images, if that differs from image_layout
    # (LLaVA-OneVision then drops anyres tiling); None: each image as if alone.
    multi_image_tokens: Callable[[object], int] | None = None
    # data.min_pixels / max_pixels apply: the image processor sizes images by pixel count (Qwen2-VL).
    pixel_bounds: bool = True
    # Video: the placeholder token and the token layout (None: this family does not take video), the key of the
    # video processor's output that must equal the planned grids, and the temporal position rule (None: one
    # position per temporal patch).
    video_token: str | None = None
    video_layout: VideoLayoutFn | None = None
    video_grid_key: str = "video_grid_thw"
    video_time_step: VideoTimeFn | None = None
    # Extra inputs generate() needs beside ids, mask and pixels: (processor, left-padded ids) -> {key: tensor}.
    generation_inputs: Callable[[object, torch.Tensor], dict] | None = None
    extra: dict = field(default_factory=dict)

    def component_of(self, param_name: str) -> str:
        """'projector', 'vision', 'language' or 'other' for a parameter name of the (PEFT-wrapped) model."""
        name = _strip_peft_prefix(param_name)
        if name.startswith(self.projector_prefix + "."):
            return "projector"
        if name.startswith(self.vision_prefix + "."):
            return "vision"
        if name.startswith(self.language_prefix + ".") or name.startswith("lm_head"):
            return "language"
        return "other"


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name
