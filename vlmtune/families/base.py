"""What vlmtune knows about one model family, in one place: the `Family` record every family module fills in.

Generic code asks the family; it never tests a model name, a model type or a family's processor key.
A family module holds everything below plus the builder of its tiny offline test model, and registers
itself with one line in `families/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImagePlan:
    """One image of one sample as its family plans it, from the image's size alone.

    `grid`: what the image processor will report for it (checked when the image is loaded; Qwen's positions use
    it). `text`: what the processor writes in place of the image's placeholder, the full token sequence of the
    image (`<start_of_image>` + soft tokens + `<end_of_image>`, tiles with row/column markers, a run of pads);
    the formatter tokenizes it in context, exactly as the processor does, and never puts a label on it.
    `tokens`: its length in tokens (what the token budget counts)."""

    grid: tuple[int, ...]
    text: str
    tokens: int


@dataclass(frozen=True)
class PixelKnobs:
    """How `data.min_pixels` / `data.max_pixels` (and the video ones) map onto a family's processors.

    `factor`: images are resized to multiples of factor x factor pixels (patch x merge), so no bound may be
    below factor². `get(p)` -> (min, max) of an image or video processor; `set(p, min, max)` sets the given
    ones in place; `call_kwargs(p, max)` -> keyword arguments processing one call under a lower max."""

    factor: int
    get: Callable[[object], tuple[int | None, int | None]]
    set: Callable[[object, int | None, int | None], None]
    call_kwargs: Callable[[object, int], dict]


# (processor, [(height, width) per image of one sample]) -> one plan per image
PlanImagesFn = Callable[[object, Sequence[tuple[int, int]]], list[ImagePlan]]
@dataclass(frozen=True)
class LigerPatch:
    """How liger-kernel patches a family's model instance (liger.py): the apply function of liger_kernel.transformers,
    the kernels asked of it by its keyword names (rms_norm, swiglu, layer_norm, geglu, rope; every other kernel it
    takes is passed false), and the liger modules it imports when called, imported while planning so that a liger
    release that cannot patch the installed transformers is found before the model loads, with its ImportError."""

    function: str
    kernels: tuple[str, ...]
    imports: tuple[str, ...] = ()


# (processor, [PIL images of one sample], extra processor kwargs) -> the image processor's outputs
ImageInputsFn = Callable[[object, list, dict], dict]
# (processor, frames, height, width) -> (video tokens, grid) for a video of that many frames and size
VideoLayoutFn = Callable[[object, int, int, int], tuple[int, tuple[int, ...]]]
# (input_ids, image grids, processor[, videos=((grid, temporal step), ...)]) -> position ids (rows, seq_len)
# for one unpadded sequence; `videos` is passed only when the sequence has videos
PositionFn = Callable[..., torch.Tensor]
# (processor, input ids) -> per-token inputs the model needs beside the ids, one value per token (padding: 0)
TokenInputsFn = Callable[[object, list[int]], dict[str, list[int]]]


def default_image_inputs(processor, images: list, kwargs: dict) -> dict:
    """One sample's images through the image processor as one nested list, as the processor groups them."""
    return dict(processor.image_processor(images=[images], return_tensors="pt", **kwargs))


def blank_image_inputs(family: Family, processor) -> dict[str, torch.Tensor]:
    """Vision inputs for one small blank image, as the family's own image processing makes them."""
    from PIL import Image

    out = family.image_inputs(processor, [Image.new("RGB", (32, 32), (0, 0, 0))], {})
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def concat_encoder_outputs(parts: list):
    """One output of get_image_features (get_video_features) for a batch, from the outputs of its examples each
    encoded alone, in batch order: tensors concatenate along dim 0 (images or tiles), lists of tensors (one per
    image or per sample) join, and lists of lists (one per layer, e.g. Qwen3-VL's DeepStack features) join
    layer by layer."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if first and isinstance(first[0], (list, tuple)):
        return [concat_encoder_outputs(list(layer)) for layer in zip(*parts, strict=True)]
    return [item for part in parts for item in part]


def grid_key(key: str) -> Callable[[dict], list | None]:
    """`made_grids` reading one output of the image (video) processor, e.g. `image_grid_thw`."""

    def made(outputs: dict) -> list | None:
        value = outputs.get(key)
        return None if value is None else value.tolist()

    return made


@dataclass(frozen=True)
class Family:
    """A model family: everything vlmtune needs to know about it (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    description: str
    model_class: str  # the transformers class (by name) that loads the family's checkpoints
    # --- modules: parameter-path prefixes of the loaded model
    vision_prefix: str
    projector_prefixes: tuple[str, ...]
    language_prefix: str
    default_lora_targets: tuple[str, ...]  # module names (or one regex) LoRA goes on by default
    skip_quantization: tuple[str, ...]  # module paths kept out of 4-bit/8-bit (matched from the path's start)
    # --- chat: the token the template writes per image, the reply's end token(s)
    image_placeholder: str
    end_of_turn: tuple[str, ...]
    plan_images: PlanImagesFn
    # the chat template ends a reply with no end token: the tokenizer's EOS is appended (as an id, never text)
    append_eos_after_reply: bool = False
    # --- images
    image_inputs: ImageInputsFn = default_image_inputs
    made_grids: Callable[[dict], list | None] | None = None  # grids the processor made (None: nothing to check)
    pixels: PixelKnobs | None = None  # None: data.min_pixels / max_pixels do not apply
    size_knob: str = ""  # what sizes this family's images instead (named when min/max_pixels are refused)
    # --- batching: processor outputs concatenated along dim 0 (other dims zero-padded); per-token inputs
    concat_keys: tuple[str, ...] = ("pixel_values",)
    # the concat_keys only the vision encoder reads: left out of a batch whose features come from the vision cache
    encoder_only_keys: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    token_inputs: TokenInputsFn | None = None
    token_keys: tuple[str, ...] = ()  # the keys token_inputs returns (padded like input_ids, with 0)
    position_ids: PositionFn | None = None  # None: the model's default 1-D positions
    # --- video (None: the family takes no video)
    video_placeholder: str | None = None
    video_layout: VideoLayoutFn | None = None
    video_text: Callable[[object, object], str] | None = None  # (processor, VideoClip) -> text; None: pads
    video_inputs: Callable[[object, list, list], dict] | None = None  # (processor, frames per video, clips)
    made_video_grids: Callable[[dict], list | None] | None = None
    video_time_step: Callable[[object, float], float] | None = None  # (model config, seconds per grid) -> step
    # --- training
    fp16_overflows: bool = False
    # why `train.packing` is refused for this family ("": it packs); packed rows keep examples apart by position
    # ids alone (data/packing.py), so a family whose attention needs more than positions cannot pack
    packing_refused: str = ""
    # (family, processor) -> vision inputs ZeRO-3 runs on a batch without images (see distributed/zero3.py)
    dummy_vision_inputs: Callable[[Family, object], dict] = blank_image_inputs
    # the outputs of the model's get_image_features that the model feeds on (its dummy image feeds on them all,
    # so a text-only batch gives every trained vision/projector weight a gradient, as an image batch does)
    image_feature_outputs: tuple[str, ...] = ("pooler_output",)
    # (outputs of one image_feature_outputs name, one per example) -> that output for the batch (vision cache)
    combine_encoder_outputs: Callable[[list], object] = concat_encoder_outputs
    # liger-kernel's patch of this family (None: liger has none); the fused linear cross-entropy is never asked
    liger: LigerPatch | None = None
    # --- the tiny offline test model: builtin name, and () -> (config, model class, processor)
    tiny_name: str = ""
    build_tiny: Callable[[], tuple[object, type, object]] | None = None

    def load_class(self):
        """The transformers model class of this family."""
        import transformers

        return getattr(transformers, self.model_class)

    @property
    def packs(self) -> bool:
        return not self.packing_refused

    def takes_video(self) -> bool:
        return self.video_layout is not None

    def component_of(self, param_name: str) -> str:
        """'projector', 'vision', 'language' or 'other' for a parameter name of the (PEFT-wrapped) model."""
        name = param_name.removeprefix("base_model.model.")
        if any(name.startswith(p + ".") for p in self.projector_prefixes):
            return "projector"
        if name.startswith(self.vision_prefix + "."):
            return "vision"
        if name.startswith(self.language_prefix + ".") or name.startswith("lm_head"):
            return "language"
        return "other"

    def video_sequence(self, processor, clip) -> str:
        """The text a video's placeholder becomes (default: one placeholder per video token)."""
        if self.video_text is not None:
            return self.video_text(processor, clip)
        return self.video_placeholder * clip.tokens
