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
    """transformers' CLIPTokenizer over a BPE vocabulary learned here, the same on every build (tokenizers' trainer
    breaks ties between equally frequent pairs differently from run to run); every byte (alone and word-final)
    is in it, so any text encodes without unknown tokens."""
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                       normalizers.Lowercase()])
    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    words: Counter = Counter()
    for line in _corpus():
        for piece, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([BOS, EOS, *alphabet, *(c + "</w>" for c in alphabet)])}
    merges = []
    while len(vocab) < vocab_size + len(alphabet):
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # the most frequent; ties by the pair itself
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = Counter({_merge(word, best): n for word, n in words.items()})
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _merge(word: tuple, pair: tuple) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)
