"""Dual-encoder (CLIP / SigLIP) embedding models: their family registry, tiny test models, loading and embedding.

    model, processor, family = load_embedding_model("builtin:tiny-clip")   # or a folder, a hub id, an adapter
    images = embed_images(model, processor, ["a.png", "b.png"], batch_size=32)  # (2, dim) float32, unit rows
    texts = embed_texts(model, processor, ["a red circle"])
    scores = texts @ images.T                                               # cosine similarities
"""

from . import registry
from .encode import (
           embed_images,
           embed_texts,
           family_of,
           image_features,
           image_inputs,
           text_features,
           text_inputs,
)
from .load import dual_encoder_family, is_adapter, load_embedding_model
from .registry import EmbeddingFamily
from .tiny import build_tiny_dir, builtin_path

registry._register_modules()

__all__ = ["EmbeddingFamily", "build_tiny_dir", "builtin_path", "dual_encoder_family", "embed_images", "embed_texts",
           "family_of", "image_features", "image_inputs", "is_adapter", "load_embedding_model", "registry",
           "text_features", "text_inputs"]
