"""InternVL3 / InternVL3.5 (HF-native `-hf` checkpoints): dynamic tiling, `<img>` + `<IMG_CONTEXT>` run + `</img>`.

The template writes `<IMG_CONTEXT>` per image; the processor cuts the image into tiles of the image processor's
`size` (the tile grid whose aspect ratio is closest to the image's, `min_patches`..`max_patches` tiles, plus a
thumbnail when there is more than one tile) and writes `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) +
`</img>` in its place. The full processor asks for the tiling (`crop_to_patches=True`) that its image processor
alone does not do by default: planning and pixel inputs both use the full processor's image kwargs.
Images are sized by tiles, not pixel counts: `data.min_pixels` / `max_pixels` do not apply. ChatML: a reply
ends with `<|im_end|>`. No video (the model takes image tiles and video frames in one `pixel_values`, in text
order, which vlmtune's separate image and video inputs do not build).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Family, ImagePlan, LigerPatch
from .llava import LLM_LINEAR

# Byte-identical to OpenGVLab/InternVL3-*-hf's chat template (shared/reference/templates/InternVL3-hf.jinja).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# The tokens InternVLProcessor reads from its tokenizer, in the order that gives the Qwen2 vocabulary's
# `<img>` 151665, `</img>` 151666, `<IMG_CONTEXT>` 151667.
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}  # fmt: skip


def processor_images_kwargs(processor) -> dict:
    """The image kwargs the full processor passes its image processor (InternVL's `crop_to_patches=True`)."""
    return processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]


def internvl_tiles(processor, height: int, width: int) -> int:
    """Tiles the processor makes of a height x width image (thumbnail included), by the image processor's rule."""
    return processor.image_processor.get_number_of_image_patches(height, width, processor_images_kwargs(processor))


def internvl_plan_images(processor, sizes: Sequence[tuple[int, int]]) -> list[ImagePlan]:
    """Each image: `<img>` + image_seq_length `<IMG_CONTEXT>` per tile + `</img>`; the grid is its tile count."""
    plans = []
    for height, width in sizes:
        tiles = internvl_tiles(processor, height, width)
        n = processor.image_seq_length * tiles
        text = processor.start_image_token + processor.image_token * n + processor.end_image_token
        plans.append(ImagePlan((tiles,), text, n + 2))
    return plans


def internvl_image_inputs(processor, images: list, kwargs: dict) -> dict:
    """One sample's images through the image processor with the full processor's image kwargs: `pixel_values`
    (tiles of every image, in order) and `num_patches` (tiles per image)."""
    merged = {**processor_images_kwargs(processor), **kwargs}
    return dict(processor.image_processor(images=[images], return_tensors="pt", **merged))


def _made_tiles(outputs: dict) -> list | None:
    value = outputs.get("num_patches")
    return None if value is None else [[int(n)] for n in value]


# ---------------------------------------------------------------- processors and the tiny offline model
def internvl_processor(tokenizer, tile: int, image_seq_length: int, max_patches: int = 12):
    """An InternVLProcessor as the hub's `-hf` checkpoints ship it (its image processor does not tile by itself;
    ImageNet mean/std; bicubic), with tiles of tile x tile pixels and the real chat template."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    size = {"height": tile, "width": tile}
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    image = GotOcr2ImageProcessor(size=size, crop_to_patches=False, min_patches=1, max_patches=max_patches,
                                  image_mean=mean, image_std=std)  # fmt: skip
    video = InternVLVideoProcessor(size=size, image_mean=mean, image_std=std)
    return InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                             image_seq_length=image_seq_length, chat_template=INTERNVL_CHAT_TEMPLATE)  # fmt: skip


_TILE, _PATCH, _DOWNSAMPLE = 32, 8, 0.5  # 4x4 patches per tile, pixel-shuffled to 2x2: 4 tokens per tile


def tiny_internvl():
    """InternVL3 layout: InternViT-style tower (CLS dropped), pixel shuffle 0.5, MLP projector, Qwen2 LLM."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from ..demo.tokenizers import build_tiny_tokenizer

    base = build_tiny_tokenizer()
    tok = type(base)(tokenizer_object=base.backend_tokenizer, **base.init_kwargs, extra_special_tokens=INTERNVL_TOKENS,
                     chat_template=INTERNVL_CHAT_TEMPLATE)  # fmt: skip
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")}
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, vocab_size=len(tok),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[_TILE, _TILE], patch_size=[_PATCH, _PATCH])  # fmt: skip
    seq = int((_TILE // _PATCH) ** 2 * _DOWNSAMPLE**2)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                         image_seq_length=seq, downsample_ratio=_DOWNSAMPLE, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")  # fmt: skip
    return cfg, InternVLForConditionalGeneration, internvl_processor(tok, _TILE, seq, max_patches=6)


INTERNVL = Family(
    name="internvl",
    model_types=("internvl",),
    description="InternVL3 / InternVL3.5 (HF-native -hf checkpoints)",
    model_class="InternVLForConditionalGeneration",
    vision_prefix="model.vision_tower",
    projector_prefixes=("model.multi_modal_projector",),
    language_prefix="model.language_model",
    default_lora_targets=LLM_LINEAR,
    skip_quantization=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    image_placeholder="<IMG_CONTEXT>",
    end_of_turn=("<|im_end|>",),
    plan_images=internvl_plan_images,
    image_inputs=internvl_image_inputs,
    made_grids=_made_tiles,
    size_knob="its image processor's tile `size` (height x width pixels) and `max_patches` (tiles per image, "
              "plus a thumbnail)",
    concat_keys=("pixel_values",),  # forward() takes only pixel_values: every image's tiles, in order
    # the vision tower's norms, then the language model's own patch (qwen2 in InternVL3)
    liger=LigerPatch("apply_liger_kernel_to_internvl", ("rms_norm", "layer_norm", "swiglu", "rope"),
                     ("liger_kernel.transformers.model.internvl",)),
    tiny_name="tiny-internvl",
    build_tiny=tiny_internvl,
)
FAMILIES = (INTERNVL,)
