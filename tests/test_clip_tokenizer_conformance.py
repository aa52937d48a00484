"""vlmtune's CLIP text inputs (embedding.text_inputs) with the real CLIP BPE vocabulary equal open_clip's tokenizer:
the same ids up to the end-of-text token, the 77-token cut ending in it, and, with padding after it (theirs 0,
ours end-of-text under the attention mask), the same text embeddings from a CLIP text tower. The vocabulary is the
one the open_clip_torch package ships (bpe_simple_vocab_16e6.txt.gz), read offline."""

from __future__ import annotations

import gzip
import math
from types import SimpleNamespace

import open_clip
import pytest
import torch

from vlmtune.embedding import registry, text_features, text_inputs

CAPTIONS = [
    "a photo of a cat",
    "Two dogs playing in the snow, one of them is brown.",
    "It's 3:45pm & the café's open!!",
    "A   lot    of   spaces\tand\nnewlines  ",
    "COCO-style caption with UPPER case, numbers 1234567 and émojis-free accents: naïve façade",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 12),  # past 77 tokens: cut
]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@pytest.fixture(scope="module")
def real_clip_tokenizer():
    """transformers' CLIPTokenizer over open_clip's vocabulary, built as OpenAI's CLIP builds its encoder: the 256
    byte symbols, each with `</w>`, the 48894 merges, then the start and end of text."""
    from transformers import CLIPTokenizer

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def test_text_inputs_equal_open_clips_tokens(real_clip_tokenizer):
    theirs = open_clip.tokenizer.SimpleTokenizer()(CAPTIONS)  # (n, 77), 0 after the end of text
    tok = real_clip_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id) == (theirs[0, 0].item(), open_clip.tokenizer.SimpleTokenizer().eot_token_id)
    ours = text_inputs(SimpleNamespace(tokenizer=tok), registry.get("clip"), CAPTIONS)
    assert ours["input_ids"].shape[1] == 77  # the longest caption is cut to the context length
    for row, (ids, mask) in enumerate(zip(ours["input_ids"], ours["attention_mask"], strict=True)):
        n = int(mask.sum())
        assert ids[:n].tolist() == theirs[row, :n].tolist(), CAPTIONS[row]
        assert ids[n - 1] == tok.eos_token_id and not theirs[row, n:].any()
        assert (ids[n:] == tok.pad_token_id).all() and tok.pad_token_id == tok.eos_token_id
    assert int(ours["attention_mask"][-1].sum()) == 77 and theirs[-1, -1] == tok.eos_token_id


def test_the_text_tower_embeds_both_alike(real_clip_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    tok = real_clip_tokenizer
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=len(tok), max_position_embeddings=77,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=64,
                        logit_scale_init_value=math.log(1 / 0.07))
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    ours = text_inputs(SimpleNamespace(tokenizer=tok), registry.get("clip"), CAPTIONS)
    theirs = open_clip.tokenizer.SimpleTokenizer()(CAPTIONS)
    with torch.no_grad():
        a = text_features(model, **ours)
        b = text_features(model, theirs)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], a[1], atol=1e-3)  # the captions do embed differently
