"""Qwen2-VL and Qwen2.5-VL: ChatML layout, `<|image_pad|>` / `<|video_pad|>` runs, 3-D multimodal RoPE positions.

Images are resized to multiples of patch x merge (14 x 2 = 28) pixels within the image processor's pixel
bounds (`size` = shortest/longest edge, in pixels): `data.min_pixels` / `max_pixels` set them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Family, ImagePlan, LigerPatch, PixelKnobs, grid_key

QWEN_LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Byte-identical to Qwen2-VL / Qwen2.5-VL Instruct's chat template (the tiny models use it).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- pixel bounds (`size` in pixels)
def _get_bounds(processor) -> tuple[int | None, int | None]:
    size = processor.size
    return size.get("shortest_edge"), size.get("longest_edge")


def _bounded_size(size, min_pixels: int | None = None, max_pixels: int | None = None):
    """A processor's `size` with the given bounds replaced, of the same type (dict or transformers' SizeDict)."""
    new = dict(size)
    if min_pixels:
        new["shortest_edge"] = min_pixels
    if max_pixels:
        new["longest_edge"] = max_pixels
    return new if isinstance(size, dict) else type(size)(**new)


def _set_bounds(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    if min_pixels or max_pixels:
        processor.size = _bounded_size(processor.size, min_pixels, max_pixels)


def _call_kwargs(processor, max_pixels: int) -> dict:
    return {"size": {k: v for k, v in dict(_bounded_size(processor.size, max_pixels=max_pixels)).items()
                     if v is not None}}


def qwen_pixel_knobs(factor: int) -> PixelKnobs:
    """Qwen-style pixel bounds for images resized to multiples of factor x factor pixels."""
    return PixelKnobs(factor=factor, get=_get_bounds, set=_set_bounds, call_kwargs=_call_kwargs)


# ---------------------------------------------------------------- token layout
def qwen_grid(processor, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the image processor makes of a height x width image."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])
    return 1, h // ip.patch_size, w // ip.patch_size


def qwen_plan_images(processor, sizes: Sequence[tuple[int, int]]) -> list[ImagePlan]:
    """Each image becomes a run of `<|image_pad|>`, one per merged patch (t·h·w / merge²)."""
    merge = processor.image_processor.merge_size
    plans = []
    for height, width in sizes:
        grid = qwen_grid(processor, height, width)
        n = grid[0] * grid[1] * grid[2] // merge**2
        plans.append(ImagePlan(grid, "<|image_pad|>" * n, n))
    return plans


def qwen_video_layout(processor, frames: int, height: int, width: int) -> tuple[int, tuple[int, int, int]]:
    """Video tokens and the (t, h, w) patch grid the video processor makes of `frames` frames of height x width."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size
    low, high = vp.size["shortest_edge"], vp.size["longest_edge"]
    if getattr(vp, "cap_pixels_per_frame", False):  # the processor's share of a total-video pixel budget
        total = int(vp.max_video_tokens * factor * factor * 0.9)
        high = max(min(high, total * vp.temporal_patch_size // frames), int(low * 1.05))
    h, w = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
    grid = (-(-frames // vp.temporal_patch_size), h // vp.patch_size, w // vp.patch_size)
    return grid[0] * grid[1] * grid[2] // vp.merge_size**2, grid


def qwen_video_inputs(processor, frames: list, clips: list) -> dict:
    """The sampled frames through the video processor (frames are sampled by vlmtune, not again by it)."""
    vp = processor.video_processor
    kwargs = {"do_sample_frames": False}
    if hasattr(vp, "cap_pixels_per_frame"):  # explicit, as planned (and without its deprecation warning)
        kwargs["cap_pixels_per_frame"] = bool(vp.cap_pixels_per_frame)
    return dict(vp(videos=frames, return_tensors="pt", **kwargs))


def qwen2_5_video_time_step(config, seconds_per_grid: float) -> float:
    """Qwen2.5-VL: a temporal patch advances time positions by tokens_per_second x the seconds it covers
    (computed in float32, as the model's `get_rope_index` does)."""
    if config is None:
        raise ValueError("video positions of this model need its config (vision_config.tokens_per_second); "
                         "pass model_config to to_dataset")
    vision = getattr(config, "vision_config", config)
    step = torch.tensor(vision.tokens_per_second, dtype=torch.float32) * torch.tensor(seconds_per_grid,
                                                                                         dtype=torch.float32)
    return float(step)


def qwen_mrope_positions(input_ids: torch.Tensor, image_grids: Sequence[Sequence[int]], processor,
                         videos: Sequence[tuple[Sequence[int], float]] = ()) -> torch.Tensor:
    """M-RoPE position ids (3, L) for one unpadded sequence with image and video runs.

    Text tokens advance all three axes together; an image or video run of grid (t, h, w) gets
    (time, row, column) positions offset by the text position before it, and the text after it
    resumes at max(h, w) / merge past that offset, as Qwen2-VL's own `get_rope_index` does.
    Time is the temporal patch index times its step: 1 for images, the family's rule for videos
    (`videos`: (grid, step) per video, in order).
    """
    merge = processor.image_processor.merge_size
    tok = processor.tokenizer
    runs = {tok.convert_tokens_to_ids("<|image_pad|>"): iter([(g, 1.0) for g in image_grids]),
            tok.convert_tokens_to_ids("<|video_pad|>"): iter(videos)}
    ids = input_ids.tolist()
    n = len(ids)
    pieces = []
    pos, i = 0, 0
    while i < n:
        j = i
        if ids[i] in runs:
            (t, h, w), step = next(runs[ids[i]])
            gh, gw = h // merge, w // merge
            tt = (torch.arange(t) * step).long().repeat_interleave(gh * gw)
            hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
            ww = torch.arange(gw).repeat(t * gh)
            pieces.append(torch.stack([tt, hh, ww]) + pos)
            j = i + t * gh * gw
            pos += max(gh, gw)
        else:
            while j < n and ids[j] not in runs:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        i = j
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1)


def qwen_token_inputs(processor, input_ids: list[int]) -> dict[str, list[int]]:
    """`mm_token_type_ids` (1 image, 2 video, 0 text): generate() derives Qwen's 3-D positions from them; without
    them it silently gives image tokens plain 1-D positions, unlike training."""
    return {"mm_token_type_ids": [int(x) for x in processor.create_mm_token_type_ids([input_ids])[0]]}


# ---------------------------------------------------------------- tiny offline models
_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=4096, max_window_layers=2, rms_norm_eps=1e-6, rope_theta=1e6,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
)  # fmt: skip
_MIN_PIXELS, _MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64


def qwen_special_ids(tok) -> dict[str, int]:
    """Config ids of the Qwen2-VL special tokens in a (tiny or real) Qwen2 tokenizer."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                     "<|vision_start|>", "<|vision_end|>")}
    return dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip


def _tiny(config_cls: str, processor_cls: str, model_cls: str, vision: dict, tie: bool):
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from ..demo.tokenizers import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=QWEN_VL_CHAT_TEMPLATE)
    ids = qwen_special_ids(tok)
    text = dict(_TEXT, vocab_size=len(tok), **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    cfg = getattr(transformers, config_cls)(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    pixels = dict(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS)
    proc = getattr(transformers, processor_cls)(
        image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_VL_CHAT_TEMPLATE,
    )  # fmt: skip
    return cfg, getattr(transformers, model_cls), proc


def tiny_qwen2_vl():
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    return _tiny("Qwen2VLConfig", "Qwen2VLProcessor", "Qwen2VLForConditionalGeneration", vision, tie=True)


def tiny_qwen2_5_vl():
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  tokens_per_second=2)  # fmt: skip
    return _tiny("Qwen2_5_VLConfig", "Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration", vision, tie=False)


def _qwen(name: str, model_types: tuple[str, ...], description: str, **kw) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        description=description,
        vision_prefix="model.visual",
        projector_prefixes=("model.visual.merger",),
        language_prefix="model.language_model",
        default_lora_targets=QWEN_LLM_LINEAR,
        skip_quantization=("model.visual", "lm_head"),
        image_placeholder="<|image_pad|>",
        end_of_turn=("<|im_end|>",),
        plan_images=qwen_plan_images,
        made_grids=grid_key("image_grid_thw"),
        pixels=qwen_pixel_knobs(28),
        concat_keys=("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"),
        token_inputs=qwen_token_inputs,
        token_keys=("mm_token_type_ids",),
        position_ids=qwen_mrope_positions,
        video_placeholder="<|video_pad|>",
        video_layout=qwen_video_layout,
        video_inputs=qwen_video_inputs,
        made_video_grids=grid_key("video_grid_thw"),
        fp16_overflows=True,
        **kw,
    )


# Liger's M-RoPE kernel replaces apply_multimodal_rotary_pos_emb, which transformers 5 no longer calls (the rotary
# embedding lays the sections out and attention applies the plain rotation): rope is not asked
QWEN2_VL = _qwen("qwen2_vl", ("qwen2_vl",), "Qwen2-VL (2B/7B/72B)", model_class="Qwen2VLForConditionalGeneration",
                 liger=LigerPatch("apply_liger_kernel_to_qwen2_vl", ("rms_norm", "swiglu", "layer_norm"),
                                  ("liger_kernel.transformers.model.qwen2_vl",)),
                 tiny_name="tiny-qwen2-vl", build_tiny=tiny_qwen2_vl)  # one time position per patch
QWEN2_5_VL = _qwen("qwen2_5_vl", ("qwen2_5_vl",), "Qwen2.5-VL (3B/7B/32B/72B)",
                   model_class="Qwen2_5_VLForConditionalGeneration", video_time_step=qwen2_5_video_time_step,
                   liger=LigerPatch("apply_liger_kernel_to_qwen2_5_vl", ("rms_norm", "swiglu"),
                                    ("liger_kernel.transformers.model.qwen2_5_vl",)),
                   tiny_name="tiny-qwen2.5-vl", build_tiny=tiny_qwen2_5_vl)
FAMILIES = (QWEN2_VL, QWEN2_5_VL)
