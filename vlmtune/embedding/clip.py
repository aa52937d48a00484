"""CLIP (transformers `CLIPModel`): symmetric InfoNCE with the learnable temperature `logit_scale`."""

from __future__ import annotations

import math

from .registry import EmbeddingFamily


def build_tiny_clip():
    """A tiny random CLIP: 2-layer towers of width 64 (the least bitsandbytes' CPU 4-bit kernel takes), 32-px images in 8-px patches, the tiny BPE tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .tiny_tokenizer import build_tiny_clip_tokenizer

    tok = build_tiny_clip_tokenizer()
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=64, logit_scale_init_value=math.log(1 / 0.07),
    )  # fmt: skip
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return config, CLIPModel, CLIPProcessor(image_processor=images, tokenizer=tok)


FAMILIES = [
    EmbeddingFamily(
        name="clip",
        model_types=("clip",),
        description="OpenAI CLIP and its fine-tunes (openai/clip-vit-*, laion CLIP-ViT in transformers format)",
        model_class="CLIPModel",
        loss="infonce",
        towers={"vision": "vision_model", "text": "text_model"},
        projections={"vision": "visual_projection", "text": "text_projection"},
        temperature=("logit_scale",),
        tiny_name="tiny-clip",
        build_tiny=build_tiny_clip,
    )
]
