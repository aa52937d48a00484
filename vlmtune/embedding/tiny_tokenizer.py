"""A tiny CLIP-style BPE tokenizer built offline (lower-cased words, `</w>` ends a word), trained on caption text."""

from __future__ import annotations

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _corpus() -> list[str]:
    from ..demo.shapes import COLOURS, SHAPES
    from ..demo.tokenizers import _GENERIC_TEXT

    words = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    words += [f"a photo of a {c} {s} on the {side}" for c in COLOURS for s in SHAPES for side in ("left", "right")]
    return words * 3 + [line for line in _GENERIC_TEXT.splitlines() if line]


def build_tiny_clip_tokenizer(vocab_size: int = 600, model_max_length: int = 32):
    """transformers' CLIPTokenizer over a BPE vocabulary trained here; every byte (alone and word-final) is in it,
    so any text encodes without unknown tokens."""
    import json

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    backend = Tokenizer(BPE(end_of_word_suffix="</w>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[BOS, EOS],
                         initial_alphabet=alphabet, end_of_word_suffix="</w>")
    backend.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    for char in sorted(alphabet):
        for piece in (char, char + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
