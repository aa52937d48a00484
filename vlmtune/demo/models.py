"""Tiny random models per family, saved as real local model folders and cached as builtin models."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .templates import LLAVA_CHAT_TEMPLATE, ONEVISION_CHAT_TEMPLATE, QWEN_VL_CHAT_TEMPLATE, SPECIAL_TOKENS
from .tokenizers import build_tiny_llama_tokenizer, build_tiny_tokenizer

BUILTIN_MODELS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-llava": "llava",
                  "tiny-llava-next": "llava_next", "tiny-llava-onevision": "llava_onevision"}
_BUILD_VERSION = 1
_MARKER = "vlmtune-builtin.json"


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
        # saving may import DeepSpeed, whose logger prints to stdout: keep stdout for the command's output
        # (`inspect --json` on a first run)
        with contextlib.redirect_stdout(sys.stderr):
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
    """Changes whenever the demo code changes, so cached builtin models never go stale."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return f"{_BUILD_VERSION}-{digest.hexdigest()[:16]}"


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
