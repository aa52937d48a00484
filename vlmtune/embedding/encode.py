"""Embeddings of images and texts under a dual encoder: the inputs its processor makes, the L2-normalised features.

`image_features` / `text_features` keep the autograd graph (training calls them); `embed_images` /
`embed_texts` run them batched under no_grad and return float32 numpy arrays, one unit-norm row per input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import registry
from .registry import EmbeddingFamily


def family_of(model) -> EmbeddingFamily:
    """The embedding family of a loaded model (a PEFT-wrapped one too), from its config's model_type."""
    return registry.for_model_type(model.config.model_type)


def image_inputs(processor, images: Sequence) -> dict[str, torch.Tensor]:
    """pixel_values for a list of images (paths or PIL images), decoded as RGB."""
    from ..data.images import load_rgb

    pil = [load_rgb(im) if isinstance(im, (str, bytes)) or hasattr(im, "__fspath__") else im.convert("RGB")
           for im in images]
    return {"pixel_values": processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]}


def text_inputs(processor, family: EmbeddingFamily, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Token ids (and the attention mask where the tokenizer makes one), padded as the family was trained."""
    tok = processor.tokenizer
    out = tok(list(texts), padding=family.text_padding, truncation=True, max_length=tok.model_max_length,
              return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask")}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-norm image embeddings (float32), with gradients when enabled."""
    return _unit(model.get_image_features(pixel_values=pixel_values).pooler_output)


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-norm text embeddings (float32), with gradients when enabled."""
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    return _unit(model.get_text_features(input_ids=input_ids, **kwargs).pooler_output)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batched(items: Sequence, batch_size: int, embed, progress: bool, what: str):
    import numpy as np
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = []
    starts = range(0, len(items), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=f"embedding {what}", unit="batch", disable=not progress):
            out.append(embed(items[start:start + batch_size]).cpu().numpy())
    return np.concatenate(out).astype("float32") if out else np.zeros((0, 0), dtype="float32")


def embed_images(model, processor, images: Sequence, batch_size: int = 32, progress: bool = False):
    """(len(images), dim) float32 numpy array of unit-norm image embeddings; images are paths or PIL images."""
    device = _device(model)

    def embed(chunk):
        return image_features(model, image_inputs(processor, chunk)["pixel_values"].to(device, model.dtype))

    return _batched(list(images), batch_size, embed, progress, "images")


def embed_texts(model, processor, texts: Sequence[str], batch_size: int = 64, progress: bool = False):
    """(len(texts), dim) float32 numpy array of unit-norm text embeddings."""
    family, device = family_of(model), _device(model)

    def embed(chunk):
        return text_features(model, **{k: v.to(device) for k, v in text_inputs(processor, family, chunk).items()})

    return _batched(list(texts), batch_size, embed, progress, "texts")
