"""SigLIP (transformers `SiglipModel`): the pairwise sigmoid loss with learnable `logit_scale` and `logit_bias`.

SigLIP 2's fixed-resolution checkpoints (google/siglip2-*-patch16-224 ...) publish model_type `siglip` and load
through `SiglipModel` too; its NaFlex checkpoints (model_type `siglip2`, `Siglip2Model`, variable patch grids)
are not covered by this family.
"""

from __future__ import annotations

import math

from .registry import EmbeddingFamily


def build_tiny_siglip():
    """A tiny random SigLIP: 2-layer towers of width 64, 32-px images in 8-px patches, texts padded to 16 tokens."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    from .tiny_tokenizer import build_tiny_clip_tokenizer

    tok = build_tiny_clip_tokenizer(model_max_length=16)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(tower, image_size=32, patch_size=8),
    )  # fmt: skip
    images = SiglipImageProcessor(size={"height": 32, "width": 32})
    return config, SiglipModel, SiglipProcessor(image_processor=images, tokenizer=tok)


def init_tiny_siglip(model) -> None:
    """SigLIP's published initial temperature and bias (log 10, -10); the config's random init differs."""
    import torch

    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)


FAMILIES = [
    EmbeddingFamily(
        name="siglip",
        model_types=("siglip",),
        description="Google SigLIP and SigLIP 2 fixed-resolution checkpoints (google/siglip-*, google/siglip2-*)",
        model_class="SiglipModel",
        loss="sigmoid",
        towers={"vision": "vision_model", "text": "text_model"},
        projections={"vision": "vision_model.head", "text": "text_model.head"},
        temperature=("logit_scale", "logit_bias"),
        text_padding="max_length",
        tiny_name="tiny-siglip",
        build_tiny=build_tiny_siglip,
        init_tiny=init_tiny_siglip,
    )
]
