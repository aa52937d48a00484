"""Tiny tokenizers built offline: a Qwen2-style byte-level BPE and a Llama-2-style one."""

from __future__ import annotations

from .shapes import COLOURS, SHAPES, SYSTEM_PROMPT, _qa_colour, _qa_count, _qa_shape, _qa_side, _qa_total

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_GENERIC_TEXT = """
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Please describe the image in one sentence. What do you see in this photo? I see a small house near a river.
Hello! How are you today? I am fine, thank you. Can you help me with my homework? Of course I can.
The weather is nice and the sun is shining. It will rain tomorrow, so take an umbrella.
She reads a book every night before she goes to sleep. They walked to the market to buy fresh bread.
Answer the question about the image. Look at the picture carefully and count the objects.
The model learns to answer short questions. Training loss should go down quickly.
Where is the cat? The cat is under the table. Is there a dog in the garden? Yes, there is a dog.
This is a test of the tokenizer. Numbers like 1, 2, 3, 10, 42 and 2024 should also work.
Do not worry about mistakes; we learn from them. Let's write some code and train a model.
My name is Sam and I live in a big city with many people, cars, trees and tall buildings.
On the left there is a chair, and on the right there is a lamp. The box is in the middle.
Who, what, when, where, why and how are question words. Thanks for your answer.
about above after again against all also always an and any are around as ask at away back be
because been before being below between big both but by call came can change child children city
close cold come could country day did different do does down each early earth end even every eye
face family far father feel few find first follow food for found four from get girl give go good
great group grow had hand hard has have he head hear help her here high him his home house how
idea if important in into is it its just keep kind know land large last late learn leave left
life light like line list little live long look made make man many may me mean men might mile more
morning most mother move much must my name near need never new next night no not now number of
off often old once one only open or other our out over own page paper part people picture place
plant play point put question quick quickly read real right river road room run said same saw say
school sea second see seem sentence set she should show side small so some something sometimes
song soon sound spell stand start state still stop story study such sun take talk tell than that
the their them then there these they thing think this those thought three through time to
together too took tree try turn two under until up us use very walk want was watch water way we
well went were what when where which while white who why will with without word work world would
write year yes you young your zero five six seven eight nine ten hundred colour color shape shapes
orange purple black grey brown pink dark bright round corner edge top bottom center middle image
images photo photos video frame object objects model data train training eval test answer answers
user system assistant You are a helpful assistant.
"""


# ---------------------------------------------------------------- shapes question/answer templates


def _template_sentences() -> list[str]:
    qa = [_qa_colour(s, c) for s in SHAPES for c in COLOURS] + [
        _qa_shape(c, s) for s in SHAPES for c in COLOURS
    ]
    qa += [_qa_count(n) for n in (1, 2, 3)] + [_qa_side(d, s) for d in ("left", "right") for s in SHAPES]
    qa += [_qa_total(n) for n in range(2, 7)]
    return [SYSTEM_PROMPT] + [text for pair in qa for text in pair]


# ---------------------------------------------------------------- tokenizer
def build_tiny_tokenizer(vocab_size: int = 1000, chat_template: str | None = None):
    """A deterministic byte-level BPE Qwen2 tokenizer (~1000 tokens + Qwen's 14 special tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2TokenizerFast

    # Same pipeline as transformers' Qwen2Tokenizer, so a saved and reloaded copy is identical.
    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    roles = ["system", "user", "assistant", "You are a helpful assistant."]
    corpus = (_template_sentences() + roles) * 3 + [line for line in _GENERIC_TEXT.splitlines() if line]
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = Qwen2TokenizerFast(
        tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", add_prefix_space=False, clean_up_tokenization_spaces=False,
        model_max_length=32768, errors="replace",
    )  # fmt: skip
    tok.chat_template = chat_template
    return tok


LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def build_tiny_llama_tokenizer(vocab_size: int = 1000, chat_template: str | None = None):
    """A deterministic Llama-2 style tokenizer (SentencePiece BPE with byte fallback) plus `<image>` and `<pad>`.

    Same pipeline as llava-hf/llava-1.5-7b-hf's tokenizer.json: a `▁` is prepended to every text and
    spaces become `▁`; `<s>` is added in front; ids 0-2 are `<unk>`, `<s>`, `</s>`, then 256 byte tokens.
    """
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import TokenizersBackend

    def pipeline(tokenizer):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        return tokenizer

    # Train on words (SentencePiece pieces never hold an inner `▁`); the saved tokenizer has no pre-tokenizer.
    trained = pipeline(Tokenizer(BPE(unk_token="<unk>", byte_fallback=True)))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                         special_tokens=list(LLAMA_SPECIAL_TOKENS) + byte_tokens)
    corpus = (_template_sentences() + ["USER: ASSISTANT:"]) * 3 + [line for line in _GENERIC_TEXT.splitlines() if line]
    trained.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = pipeline(Tokenizer(BPE(vocab=model["vocab"], merges=merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True)))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (*LLAMA_SPECIAL_TOKENS, "<image>", "<pad>")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tok = TokenizersBackend(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False, model_max_length=4096,
    )  # fmt: skip
    tok.chat_template = chat_template
    return tok


# ---------------------------------------------------------------- tiny models
