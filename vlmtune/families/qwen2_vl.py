"""Qwen2-VL and Qwen2.5-VL: ChatML layout, `<|image_pad|>` / `<|video_pad|>` runs, 3-D multimodal RoPE positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import register
from .base import Family

QWEN_LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qwen_image_layout(processor, height: int, width: int) -> tuple[int, tuple[int, int, int]]:
    """Image tokens and the (t, h, w) patch grid the image processor makes of a height x width image."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])
    grid = (1, h // ip.patch_size, w // ip.patch_size)
    return grid[1] * grid[2] // ip.merge_size**2, grid


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


def qwen_generation_inputs(processor, input_ids) -> dict:
    """`mm_token_type_ids`: generate() derives Qwen's 3-D (M-RoPE) positions from them; without them it silently
    gives image tokens plain 1-D positions, unlike training."""
    import torch

    return {"mm_token_type_ids": torch.tensor(processor.create_mm_token_type_ids(input_ids.tolist()))}


def _qwen(name: str, model_types: tuple[str, ...], description: str, **kw) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        description=description,
        vision_prefix="model.visual",
        projector_prefix="model.visual.merger",
        language_prefix="model.language_model",
        image_token="<|image_pad|>",
        end_of_turn=("<|im_end|>",),
        default_lora_targets=QWEN_LLM_LINEAR,
        fp16_overflows=True,
        skip_quantization=("model.visual", "lm_head"),
        image_layout=qwen_image_layout,
        position_ids=qwen_mrope_positions,
        video_token="<|video_pad|>",
        video_layout=qwen_video_layout,
        generation_inputs=qwen_generation_inputs,
        **kw,
    )


QWEN2_VL = register(_qwen("qwen2_vl", ("qwen2_vl",), "Qwen2-VL (2B/7B/72B)"))  # one time position per patch
QWEN2_5_VL = register(_qwen("qwen2_5_vl", ("qwen2_5_vl",), "Qwen2.5-VL (3B/7B/32B/72B)",
                            video_time_step=qwen2_5_video_time_step))
