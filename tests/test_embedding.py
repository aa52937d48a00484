"""Embedding families (CLIP, SigLIP): tiny models load, embed to unit float32 rows, and reload the same."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmtune.embedding import embed_images, embed_texts, load_embedding_model, registry
from vlmtune.errors import VlmtuneError

FAMILIES = [f.name for f in registry.all_families()]


@pytest.fixture(scope="session")
def embedding_model():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_embedding_model(f"builtin:{registry.get(family).tiny_name}")
        return cache[family]

    return get


def _pictures():
    return [Image.new("RGB", (40, 30), (220, 40, 40)), Image.new("P", (32, 32), 3), Image.new("L", (20, 50), 90)]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_embeds_unit_rows_whatever_the_batch(family, embedding_model):
    model, processor, fam = embedding_model(family)
    assert fam.name == family and type(model).__name__ == fam.model_class
    one = embed_images(model, processor, _pictures(), batch_size=1)
    whole = embed_images(model, processor, _pictures(), batch_size=3)
    texts = embed_texts(model, processor, ["a red circle", "a much longer caption of a blue square", "x"], batch_size=2)
    dim = model.config.projection_dim if family == "clip" else model.config.text_config.hidden_size
    assert one.dtype == np.float32 and one.shape == (3, dim)
    np.testing.assert_allclose(one, whole, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    alone = embed_texts(model, processor, ["a red circle"])
    np.testing.assert_allclose(alone[0], texts[0], atol=1e-5)  # padding with longer texts changes nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_round_trips(family, embedding_model):
    _, processor, _ = embedding_model(family)
    ids = processor.tokenizer("A Red circle, 3 squares!")["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids[1:-1]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "a red circle , 3 squares !"


def test_a_vlm_folder_is_refused_by_name(model_dir):
    with pytest.raises(VlmtuneError, match="not a supported embedding model.*clip"):
        load_embedding_model(str(model_dir("qwen2_vl")))


def test_tiny_clip_tokenizer_is_the_same_on_every_build():
    """Two builds in fresh interpreters with different hash seeds give the same vocabulary and merges (the tiny
    models' fixtures train to the same weights run after run)."""
    import os
    import subprocess
    import sys

    code = ("from vlmtune.embedding.tiny_tokenizer import build_tiny_clip_tokenizer as b; import json; t = b(); "
            "print(json.dumps([sorted(t.get_vocab().items()), t('a red square on the left')['input_ids']]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(outs) == 1
