"""LLaVA-1.5, LLaVA-NeXT (1.6) and LLaVA-OneVision: `<image>` placeholders and plain 1-D positions.

End of a reply. The formatter supervises the end token the template itself puts right after a reply
(the family's `end_of_turn` or the tokenizer's EOS); when there is none and `append_eos_after_reply`
is set, it appends the tokenizer's EOS to the reply instead.
- llava: the LLaVA-1.5 template (`USER: … ASSISTANT: reply `) emits no `</s>`: `</s>` is appended.
- llava_next: the template depends on the checkpoint. Vicuna-style (LLaVA-1.5 layout, as the tiny
  model ships): `</s>` appended. A template that ends replies with `</s>` (Mistral-style): that token
  is supervised, nothing appended. A template whose end token is neither `</s>` nor the tokenizer's EOS
  (e.g. Llama-3 `<|eot_id|>` with a different eos_token): the EOS is appended after the reply and the
  template's token stays unsupervised context.
- llava_onevision: ChatML; `<|im_end|>` is supervised.
"""

from __future__ import annotations

from . import register
from .base import Family

LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llava_image_layout(processor, height: int, width: int) -> tuple[int, tuple[int, int]]:
    """Image tokens the processor expands one `<image>` of a height x width image to, and the (h, w) size.

    Uses the processor's own count: fixed for LLaVA-1.5 (576 at 336 px), anyres for NeXT / OneVision.
    The size is the grid: the anyres image processors report it back as `image_sizes`.
    """
    counts = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"]
    return int(counts[0]), (height, width)


def onevision_multi_image_tokens(processor) -> int:
    """Tokens per image in a multi-image sample: the base view plus one newline, as the processor expands it."""
    n = processor.num_image_tokens + 1
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def _llava(name: str, description: str, **kw) -> Family:
    return Family(
        name=name,
        model_types=(name,),
        description=description,
        vision_prefix="model.vision_tower",
        projector_prefix="model.multi_modal_projector",
        language_prefix="model.language_model",
        image_token="<image>",
        default_lora_targets=LLM_LINEAR,
        skip_quantization=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        image_layout=llava_image_layout,
        position_ids=None,
        pixel_bounds=False,
        **kw,
    )


LLAVA = register(_llava("llava", "LLaVA-1.5 (7B/13B)", end_of_turn=("</s>",), append_eos_after_reply=True,
                        grid_key=None))
LLAVA_NEXT = register(_llava("llava_next", "LLaVA-NeXT / LLaVA-1.6", end_of_turn=("</s>",),
                             append_eos_after_reply=True, grid_key="image_sizes"))
LLAVA_ONEVISION = register(_llava("llava_onevision", "LLaVA-OneVision", end_of_turn=("<|im_end|>",),
                                  grid_key="image_sizes", multi_image_tokens=onevision_multi_image_tokens))
