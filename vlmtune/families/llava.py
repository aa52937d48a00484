"""LLaVA-1.5, LLaVA-NeXT (1.6) and LLaVA-OneVision: `<image>` placeholders and plain 1-D positions.

End of a reply. The formatter supervises the end token the template itself puts right after a reply
(the family's `end_of_turn` or the tokenizer's EOS); when there is none and `append_eos_after_reply`
is set, it appends the tokenizer's EOS to the reply instead.
- llava: the LLaVA-1.5 template (`USER: … ASSISTANT: reply `) emits no `</s>`: `</s>` is appended.
- llava_next: the template depends on the checkpoint. Vicuna-style (LLaVA-1.5 layout, as the tiny
  model ships): `</s>` appended. A template that ends replies with `</s>` (Mistral-style) or `<|eot_id|>`
  (llama3-llava-next): that token is supervised, nothing appended.
- llava_onevision: ChatML; `<|im_end|>` is supervised.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Family, ImagePlan, LigerPatch

LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Byte-identical to llava-hf/llava-1.5-7b-hf's chat template (Apache-2.0): no `</s>` after a reply.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    '{% endif %}{# Render all images first #}'
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA-OneVision's ChatML layout, written from the layout (not a copy of a hub file):
# `<|im_start|>{role}\n` + one `<image>\n` per image + text + `<|im_end|>\n`; prompt `<|im_start|>assistant\n`.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] }}{% endgeneration %}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llava_plan_images(processor, sizes: Sequence[tuple[int, int]]) -> list[ImagePlan]:
    """Each `<image>` becomes the run of `<image>` tokens the processor expands it to; the grid is the (h, w) size
    (the anyres image processors report it back as `image_sizes`).

    Uses the processor's own count: fixed for LLaVA-1.5 (576 at 336 px), anyres for NeXT / OneVision."""
    counts = [int(processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0])
              for h, w in sizes]
    return [ImagePlan((h, w), "<image>" * n, n) for (h, w), n in zip(sizes, counts, strict=True)]


def onevision_plan_images(processor, sizes: Sequence[tuple[int, int]]) -> list[ImagePlan]:
    """As LLaVA-NeXT for a lone image; in a multi-image sample LLaVA-OneVision drops anyres tiling: each image is
    its base view plus one newline."""
    if len(sizes) < 2:
        return llava_plan_images(processor, sizes)
    n = processor.num_image_tokens + (0 if processor.vision_feature_select_strategy == "default" else 1)
    return [ImagePlan((h, w), "<image>" * n, n) for h, w in sizes]


def _image_sizes(outputs: dict) -> list | None:
    value = outputs.get("image_sizes")
    return None if value is None else value.tolist()


# ---------------------------------------------------------------- tiny offline models
# A 56 px CLIP / SigLIP tower with 14 px patches (16 patches per 56 px view).
_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rms_norm_eps=1e-6)  # fmt: skip
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14)  # fmt: skip
_CLIP = dict(_TOWER, model_type="clip_vision_model", projection_dim=32)
_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
_ONEVISION_PINPOINTS = [[56 * i, 56 * j] for i in range(1, 5) for j in range(1, 5)]  # up to 4x4 views: anyres_max_9


def _llama_text(tok) -> dict:
    return dict(_LLM, model_type="llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip


def tiny_llava():
    """LLaVA-1.5 layout: CLIP tower (CLS dropped: 'default'), second-last layer, Llama LLM, vicuna template."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from ..demo.tokenizers import build_tiny_llama_tokenizer

    tok = build_tiny_llama_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE)
    cfg = LlavaConfig(vision_config=_CLIP, text_config=_llama_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    image = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)  # fmt: skip
    return cfg, LlavaForConditionalGeneration, proc


def tiny_llava_next():
    """LLaVA-NeXT (vicuna) layout: as LLaVA-1.5 plus anyres tiling over small grid pinpoints."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from ..demo.tokenizers import build_tiny_llama_tokenizer

    tok = build_tiny_llama_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE)
    cfg = LlavaNextConfig(
        vision_config=_CLIP, text_config=_llama_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=_NEXT_PINPOINTS,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    image = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                    image_grid_pinpoints=_NEXT_PINPOINTS)  # fmt: skip
    proc = LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)  # fmt: skip
    return cfg, LlavaNextForConditionalGeneration, proc


def tiny_llava_onevision():
    """LLaVA-OneVision layout: SigLIP tower (all tokens: 'full'), Qwen2 LLM and tokenizer, anyres_max_9, ChatML."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    from ..demo.tokenizers import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=ONEVISION_CHAT_TEMPLATE)
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    text = dict(_LLM, model_type="qwen2", vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])  # fmt: skip
    cfg = LlavaOnevisionConfig(
        vision_config=dict(_TOWER, model_type="siglip_vision_model"), text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    size = {"height": 56, "width": 56}
    image = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_ONEVISION_PINPOINTS,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    proc = LlavaOnevisionProcessor(
        image_processor=image, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )  # fmt: skip
    return cfg, LlavaOnevisionForConditionalGeneration, proc


def _llava(name: str, description: str, model_class: str, **kw) -> Family:
    return Family(
        name=name,
        model_types=(name,),
        description=description,
        model_class=model_class,
        vision_prefix="model.vision_tower",
        projector_prefixes=("model.multi_modal_projector",),
        language_prefix="model.language_model",
        default_lora_targets=LLM_LINEAR,
        skip_quantization=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        image_placeholder="<image>",
        size_knob="its image processor's fixed `size` / anyres `image_grid_pinpoints` (not a pixel count)",
        concat_keys=("pixel_values", "image_sizes", "batch_num_images"),
        **kw,
    )


# Liger patches LLaVA through its language model's own patch (llama, mistral, qwen2...); none for NeXT / OneVision
LLAVA = _llava("llava", "LLaVA-1.5 (7B/13B)", "LlavaForConditionalGeneration", end_of_turn=("</s>",),
               append_eos_after_reply=True, plan_images=llava_plan_images, tiny_name="tiny-llava",
               liger=LigerPatch("apply_liger_kernel_to_llava", ("rms_norm", "swiglu", "rope"),
                                ("liger_kernel.transformers.model.llava",)),
               build_tiny=tiny_llava)
LLAVA_NEXT = _llava("llava_next", "LLaVA-NeXT / LLaVA-1.6", "LlavaNextForConditionalGeneration",
                    end_of_turn=("</s>", "<|eot_id|>"), append_eos_after_reply=True, plan_images=llava_plan_images, made_grids=_image_sizes,
                    tiny_name="tiny-llava-next", build_tiny=tiny_llava_next)
LLAVA_ONEVISION = _llava("llava_onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration",
                         end_of_turn=("<|im_end|>",), plan_images=onevision_plan_images, made_grids=_image_sizes,
                         tiny_name="tiny-llava-onevision", build_tiny=tiny_llava_onevision)
FAMILIES = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION)
