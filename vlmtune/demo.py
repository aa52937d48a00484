"""Offline demo assets: a tiny Qwen2 tokenizer, tiny random Qwen2-VL models and a synthetic shapes dataset.

Nothing here touches the network. ``python -m vlmtune.demo make-data OUT_DIR`` regenerates the shipped
``data_templates/shapes`` folder; ``python -m vlmtune.demo build-model NAME`` prints a builtin model's path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Byte-identical to the Qwen2-VL-Instruct / Qwen2.5-VL-Instruct chat template (Apache-2.0).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Byte-identical to llava-hf/llava-1.5-7b-hf's chat template (Apache-2.0): no `</s>` after a reply.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    '{% endif %}{# Render all images first #}'
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA-OneVision's ChatML layout, written from the layout (not a copy of a hub file):
# `<|im_start|>{role}\n` + one `<image>\n` per image + text + `<|im_end|>\n`; prompt `<|im_start|>assistant\n`.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] }}{% endgeneration %}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20)}
SYSTEM_PROMPT = "You answer questions about pictures of coloured shapes in one short sentence."
BUILTIN_MODELS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-llava": "llava",
                  "tiny-llava-next": "llava_next", "tiny-llava-onevision": "llava_onevision"}
_BUILD_VERSION = 1
_MARKER = "vlmtune-builtin.json"

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
def _qa_colour(shape: str, colour: str) -> tuple[str, str]:
    return f"What colour is the {shape}?", f"The {shape} is {colour}."


def _qa_shape(colour: str, shape: str) -> tuple[str, str]:
    return f"Which shape is {colour}?", f"The {colour} shape is a {shape}."


def _qa_count(n: int) -> tuple[str, str]:
    return "How many shapes are there?", ("There is 1 shape." if n == 1 else f"There are {n} shapes.")


def _qa_side(side: str, shape: str) -> tuple[str, str]:
    return f"Which shape is on the {side}?", f"The {shape} is on the {side}."


def _qa_total(n: int) -> tuple[str, str]:
    return "How many shapes are in the two pictures together?", f"There are {n} shapes in total."


def _template_sentences() -> list[str]:
    qa = [_qa_colour(s, c) for s in SHAPES for c in COLOURS] + [
        _qa_shape(c, s) for s in SHAPES for c in COLOURS
    ]
    qa += [_qa_count(n) for n in (1, 2, 3)] + [_qa_side(d, s) for d in ("left", "right") for s in SHAPES]
    qa += [_qa_total(n) for n in range(2, 7)]
    return [SYSTEM_PROMPT] + [text for pair in qa for text in pair]


# ---------------------------------------------------------------- tokenizer
def build_tiny_tokenizer(vocab_size: int = 1000):
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
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def build_tiny_llama_tokenizer(vocab_size: int = 1000):
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
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------- tiny models
_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=4096, max_window_layers=2, rms_norm_eps=1e-6, rope_theta=1e6,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
)  # fmt: skip
_MIN_PIXELS, _MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64


def _special_ids(tok) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip


def _qwen_vl_parts(tok, config_cls, processor_cls, vision: dict, tie: bool):
    """Config and processor for the Qwen2-VL style families (shared tokenizer, image and video processors)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    ids = _special_ids(tok)
    text = dict(
        _TEXT, vocab_size=len(tok), **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    )
    cfg = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    pixels = dict(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS)
    proc = processor_cls(
        image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_VL_CHAT_TEMPLATE,
    )  # fmt: skip
    return cfg, proc


def _build_qwen2_vl(tok):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    cfg, proc = _qwen_vl_parts(tok, Qwen2VLConfig, Qwen2VLProcessor, vision, tie=True)
    return cfg, Qwen2VLForConditionalGeneration, proc


def _build_qwen2_5_vl(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  tokens_per_second=2)  # fmt: skip
    cfg, proc = _qwen_vl_parts(tok, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, vision, tie=False)
    return cfg, Qwen2_5_VLForConditionalGeneration, proc


# Tiny LLaVA parts: a 56 px CLIP / SigLIP tower with 14 px patches (16 patches per 56 px view).
_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rms_norm_eps=1e-6)  # fmt: skip
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14)  # fmt: skip
_CLIP = dict(_TOWER, model_type="clip_vision_model", projection_dim=32)
_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
_ONEVISION_PINPOINTS = [[56 * i, 56 * j] for i in range(1, 5) for j in range(1, 5)]  # up to 4x4 views: anyres_max_9


def _llama_text(tok) -> dict:
    return dict(_LLM, model_type="llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip


def _build_llava(_tok):
    """LLaVA-1.5 layout: CLIP tower (CLS dropped: 'default'), second-last layer, Llama LLM, vicuna template."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tiny_llama_tokenizer()
    cfg = LlavaConfig(vision_config=_CLIP, text_config=_llama_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    image = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)  # fmt: skip
    return cfg, LlavaForConditionalGeneration, proc


def _build_llava_next(_tok):
    """LLaVA-NeXT (vicuna) layout: as LLaVA-1.5 plus anyres tiling over small grid pinpoints."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = build_tiny_llama_tokenizer()
    cfg = LlavaNextConfig(
        vision_config=_CLIP, text_config=_llama_text(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=_NEXT_PINPOINTS,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    image = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                    image_grid_pinpoints=_NEXT_PINPOINTS)  # fmt: skip
    proc = LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)  # fmt: skip
    return cfg, LlavaNextForConditionalGeneration, proc


def _build_llava_onevision(tok):
    """LLaVA-OneVision layout: SigLIP tower (all tokens: 'full'), Qwen2 LLM and tokenizer, anyres_max_9, ChatML."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    tok.chat_template = ONEVISION_CHAT_TEMPLATE
    ids = _special_ids(tok)
    text = dict(_LLM, model_type="qwen2", vocab_size=len(tok),
                **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})  # fmt: skip
    cfg = LlavaOnevisionConfig(
        vision_config=dict(_TOWER, model_type="siglip_vision_model"), text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    size = {"height": 56, "width": 56}
    image = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_ONEVISION_PINPOINTS,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    proc = LlavaOnevisionProcessor(
        image_processor=image, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )  # fmt: skip
    return cfg, LlavaOnevisionForConditionalGeneration, proc


# family -> builder(tiny Qwen2 tokenizer) -> (config, model class, processor); LLaVA-1.5/NeXT build a Llama one
MODEL_FAMILY_BUILDERS: dict[str, Callable[[Any], tuple[Any, Any, Any]]] = {
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
}


# A 0.02-std random output layer caps logits near zero, so LoRA alone could barely lower the loss;
# pretrained models have large output rows, which this scale imitates.
_OUTPUT_INIT_STD = 0.15


def _widen_output_logits(model) -> None:
    import torch

    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            layer.weight.normal_(0.0, _OUTPUT_INIT_STD)


def build_tiny_model_dir(out_dir: str | os.PathLike, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write a tiny randomly initialised model + processor folder that loads with from_pretrained offline."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    if family not in MODEL_FAMILY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {sorted(MODEL_FAMILY_BUILDERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    cfg, model_cls, proc = MODEL_FAMILY_BUILDERS[family](tok)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    _widen_output_logits(model)
    t = proc.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=t.bos_token_id if t.bos_token_id is not None else t.pad_token_id,
        eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
    )  # fmt: skip
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        proc.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_CACHE") or Path.home() / ".cache" / "vlmtune")


def _is_current(path: Path, family: str) -> bool:
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("family") == family and meta.get("build") == _build_id()


def _build_id() -> str:
    """Changes whenever this module changes, so cached builtin models never go stale."""
    return f"{_BUILD_VERSION}-{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}"


def builtin_model_path(name: str) -> Path:
    """Path of a builtin tiny model (see BUILTIN_MODELS), building it under the cache on first use."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    family = BUILTIN_MODELS[name]
    final = _cache_root() / "builtin" / name
    if _is_current(final, family):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        build_tiny_model_dir(tmp, family=family, seed=0)
        (tmp / _MARKER).write_text(json.dumps({"name": name, "family": family, "build": _build_id()}))
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp and safetensors default to owner-only
        if final.exists() and not _is_current(final, family):
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=final.parent))
            with contextlib.suppress(FileNotFoundError):  # a concurrent build may have moved it already
                os.replace(final, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_current(final, family):  # lost a race to a concurrent build: theirs is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- shapes dataset
def _scene(rng: random.Random, size: int) -> list[dict]:
    """1-3 shapes with distinct kinds and colours, ordered left to right, one per column."""
    n = rng.randint(1, 3)
    kinds, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    col_w = size / 3
    cols = sorted(rng.sample(range(3), n))
    scene = []
    for kind, colour, col in zip(kinds, colours, cols, strict=True):
        s = rng.randint(int(size * 0.18), int(size * 0.26))
        x0 = int(col * col_w + (col_w - s) / 2)
        y0 = rng.randint(int(size * 0.1), int(size * 0.9) - s)
        scene.append({"shape": kind, "colour": colour, "box": [x0, y0, x0 + s, y0 + s]})
    return scene


def draw_scene(scene: list[dict], size: int):
    """Render a scene as a palette PIL image (white background)."""
    from PIL import Image, ImageDraw

    img = Image.new("P", (size, size), 0)
    img.putpalette([255, 255, 255] + [v for rgb in COLOURS.values() for v in rgb])
    draw = ImageDraw.Draw(img)
    for obj in scene:
        fill = 1 + list(COLOURS).index(obj["colour"])
        x0, y0, x1, y1 = obj["box"]
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _questions(rng: random.Random, scene: list[dict]) -> list[tuple[str, str]]:
    obj = rng.choice(scene)
    pool = [
        _qa_colour(obj["shape"], obj["colour"]),
        _qa_shape(obj["colour"], obj["shape"]),
        _qa_count(len(scene)),
    ]
    if len(scene) > 1:
        pool += [_qa_side("left", scene[0]["shape"]), _qa_side("right", scene[-1]["shape"])]
    return rng.sample(pool, 2)


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _shapes_row(rng: random.Random, split: str, idx: int, out: Path, size: int) -> dict:
    kind = rng.choices(["single", "multi", "system", "two"], weights=[70, 18, 6, 6])[0]
    names = [f"{split}_{idx:04d}.png"] + ([f"{split}_{idx:04d}_b.png"] if kind == "two" else [])
    scenes = [_scene(rng, size) for _ in names]
    for name, scene in zip(names, scenes, strict=True):
        draw_scene(scene, size).save(out / "images" / name, optimize=True)
    images = [{"type": "image", "image": f"images/{name}"} for name in names]
    if kind == "two":
        pairs = [_qa_total(sum(len(s) for s in scenes))]
    else:
        pairs = _questions(rng, scenes[0])[: 2 if kind == "multi" else 1]
    messages = [{"role": "system", "content": [_text(SYSTEM_PROMPT)]}] if kind in ("system", "two") else []
    for turn, (q, a) in enumerate(pairs):
        messages.append({"role": "user", "content": (images if turn == 0 else []) + [_text(q)]})
        messages.append({"role": "assistant", "content": [_text(a)]})
    return {"messages": messages}


def make_shapes_dataset(
    out_dir: str | os.PathLike, n_train: int = 256, n_eval: int = 32, seed: int = 0, size: int = 56
) -> Path:
    """Write images/ + train.jsonl + eval.jsonl of templated shape questions (deterministic given seed)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("eval", n_eval, 1)):
        for old in (out / "images").glob(f"{split}_*.png"):
            old.unlink()
        rng = random.Random(seed * 1000 + offset)
        rows = [_shapes_row(rng, split, i, out, size) for i in range(1, n + 1)]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return out


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.demo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    data = sub.add_parser("make-data", help="write the synthetic shapes dataset")
    data.add_argument("out_dir")
    data.add_argument("--n-train", type=int, default=256)
    data.add_argument("--n-eval", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--size", type=int, default=56)
    model = sub.add_parser("build-model", help="build (or find) a builtin tiny model and print its path")
    model.add_argument("name", choices=sorted(BUILTIN_MODELS))
    args = parser.parse_args(argv)
    if args.cmd == "make-data":
        print(make_shapes_dataset(args.out_dir, args.n_train, args.n_eval, args.seed, args.size))
    else:
        print(builtin_model_path(args.name))


if __name__ == "__main__":
    _main()
