"""Qwen2-VL and Qwen2.5-VL: ChatML layout, `<|image_pad|>` runs, 3-D multimodal RoPE positions."""

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


def qwen_mrope_positions(input_ids: torch.Tensor, image_grids: Sequence[Sequence[int]], processor) -> torch.Tensor:
    """M-RoPE position ids (3, L) for one unpadded sequence with image runs.

    Text tokens advance all three axes together; an image run of grid (t, h, w) gets
    (t, row, column) positions offset by the text position before it, and the text after it
    resumes at max(h, w) / merge past that offset, as Qwen2-VL's own `get_rope_index` does.
    """
    merge = processor.image_processor.merge_size
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    is_image = (input_ids == image_token_id).tolist()
    n = len(is_image)
    pieces = []
    pos, i, grids = 0, 0, iter(image_grids)
    while i < n:
        j = i
        if is_image[i]:
            t, h, w = next(grids)
            gh, gw = h // merge, w // merge
            tt = torch.arange(t).repeat_interleave(gh * gw)
            hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
            ww = torch.arange(gw).repeat(t * gh)
            pieces.append(torch.stack([tt, hh, ww]) + pos)
            j = i + t * gh * gw
            pos += max(gh, gw)
        else:
            while j < n and not is_image[j]:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        i = j
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1)


def _qwen(name: str, model_types: tuple[str, ...], description: str) -> Family:
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
    )


QWEN2_VL = register(_qwen("qwen2_vl", ("qwen2_vl",), "Qwen2-VL (2B/7B/72B)"))
QWEN2_5_VL = register(_qwen("qwen2_5_vl", ("qwen2_5_vl",), "Qwen2.5-VL (3B/7B/32B/72B)"))
