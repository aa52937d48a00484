"""Local model folders (random weights + processor) that AutoModel / AutoProcessor load offline.

- `tiny`: vlmtune's tiny random Qwen2-VL (CPU smoke test; its FLOP shares are not the 2B model's).
- `small-qwen2-vl`: a Qwen2-VL-shaped random model of ~22M parameters, sized with flops.py so that its shares of
  a step's FLOPs (vision tower, decoder layers, LM head) are within about a point of Qwen2-VL-2B's on the
  benchmark's data at 448 px; the vocabulary (6,656 rows, beyond the offline tokenizer's ~1,100 tokens, as Qwen
  pads its own) keeps the LM head's share. Sized so that a CPU run takes minutes, not hours.
- `qwen2-vl-2b`: the real Qwen2-VL-2B architecture with random bf16 weights and the real Qwen2 tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from .common import read_json

ARCHS = ("tiny", "small-qwen2-vl", "qwen2-vl-2b")
SMALL_TEXT = dict(hidden_size=384, intermediate_size=2304, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=6656, max_position_embeddings=8192, max_window_layers=4,
                  rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
SMALL_VISION = dict(depth=4, embed_dim=320, hidden_size=384, num_heads=5, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)
SMALL_PIXELS = dict(min_pixels=56 * 56, max_pixels=896 * 896)


def _save(model, processor, out: Path) -> int:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build_small(out: Path, seed: int) -> dict:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from vlmtune.demo.tokenizers import build_tiny_tokenizer
    from vlmtune.families.qwen2_vl import QWEN_VL_CHAT_TEMPLATE, qwen_special_ids

    tok = build_tiny_tokenizer(vocab_size=4096, chat_template=QWEN_VL_CHAT_TEMPLATE)
    ids = qwen_special_ids(tok)
    if len(tok) > SMALL_TEXT["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, more than the model's {SMALL_TEXT['vocab_size']}")
    text = dict(SMALL_TEXT, **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    config = Qwen2VLConfig(text_config=text, vision_config=SMALL_VISION, tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                                               pad_token_id=ids["pad_token_id"])
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**SMALL_PIXELS), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**SMALL_PIXELS),
                                 chat_template=QWEN_VL_CHAT_TEMPLATE)
    n = _save(model, processor, out)
    return {"arch": "small-qwen2-vl", "family": "qwen2_vl", "parameters": n, "tokenizer_tokens": len(tok),
            "text_config": SMALL_TEXT, "vision_config": SMALL_VISION}


def build_2b(out: Path, reference: Path, tokenizer_reference: Path, seed: int) -> dict:
    import torch
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        GenerationConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    config = AutoConfig.from_pretrained(reference)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 2B parameters on a GPU takes seconds
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    if (reference / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(reference)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_reference)
    template = read_json(tokenizer_reference / "chat_template.json")["chat_template"]
    pp = read_json(reference / "preprocessor_config.json")
    keys = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    image_processor = Qwen2VLImageProcessor(**{k: pp[k] for k in keys if k in pp})
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    n = _save(model, processor, out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if image_id != config.image_token_id:
        raise RuntimeError(f"tokenizer <|image_pad|> id {image_id} != config image_token_id {config.image_token_id}")
    return {"arch": "qwen2-vl-2b", "family": "qwen2_vl", "parameters": n, "config": str(reference),
            "tokenizer": str(tokenizer_reference)}


def build_model_dir(arch: str, out: Path, reference: Path, tokenizer_reference: Path, seed: int) -> dict:
    """Write the model folder for `arch` into `out`; returns what was built."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "tiny":
        from vlmtune.demo import build_tiny_model_dir

        build_tiny_model_dir(out, "qwen2_vl", seed=seed)
        return {"arch": arch, "family": "qwen2_vl"}
    if arch == "small-qwen2-vl":
        return build_small(out, seed)
    if arch == "qwen2-vl-2b":
        return build_2b(out, Path(reference), Path(tokenizer_reference), seed)
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
