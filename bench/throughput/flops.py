"""A FLOP model of one LoRA training step of a Qwen2-VL-shaped model, split into vision tower, decoder layers
and LM head, so that the small CPU model can be checked against Qwen2-VL-2B on the same token counts.

Counts (multiply-add = 2 FLOPs):
- vision tower (frozen, forward only): patch embedding, per block the qkv/proj/MLP matmuls and full attention
  within each image (P^2), and the patch merger on P/4 merged tokens;
- decoder layers: 4 x linear parameters x tokens (forward 2, backward to the activations 2: the base weights are
  frozen) plus causal attention (forward 2 T^2 H, backward twice that) and the LoRA adapters (6 r (in + out) per
  module and token: forward, input and weight gradients); gradient checkpointing adds one more forward;
- LM head: 4 x hidden x vocabulary per position that gets logits (every position, or the supervised ones only).
"""

from __future__ import annotations

QWEN_LORA_MODULES = ("q", "k", "v", "o", "gate", "up", "down")


def text_dims(config: dict) -> dict:
    """The decoder's sizes from a Qwen2-VL config dict (flat, or with a text_config section)."""
    t = dict(config.get("text_config") or {})
    t = {**{k: v for k, v in config.items() if k != "vision_config"}, **t}
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    return {"hidden": t["hidden_size"], "intermediate": t["intermediate_size"], "layers": t["num_hidden_layers"],
            "heads": heads, "kv_heads": t.get("num_key_value_heads") or heads, "head_dim": head_dim,
            "vocab": t["vocab_size"]}


def vision_dims(config: dict) -> dict:
    v = config["vision_config"]
    return {"embed": v["embed_dim"], "depth": v["depth"], "mlp_ratio": v["mlp_ratio"], "out": v["hidden_size"],
            "in_pixels": v.get("in_chans", 3) * v.get("temporal_patch_size", 2) * v["patch_size"] ** 2,
            "merge": v.get("spatial_merge_size", 2) ** 2}


def decoder_linear_shapes(td: dict) -> dict[str, tuple[int, int]]:
    h, q, kv, i = td["hidden"], td["heads"] * td["head_dim"], td["kv_heads"] * td["head_dim"], td["intermediate"]
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


def decoder_parameters(td: dict) -> int:
    """Linear parameters of the decoder layers (no embeddings, no head, no norms)."""
    return td["layers"] * sum(a * b for a, b in decoder_linear_shapes(td).values())


def vision_forward_flops(vd: dict, patches: int) -> float:
    d, p = vd["embed"], patches
    per_block = 2 * p * (4 * d * d + 2 * d * vd["mlp_ratio"] * d) + 4 * p * p * d
    merged = p / vd["merge"]
    wide = vd["merge"] * d
    merger = 2 * merged * (wide * wide + wide * vd["out"])
    return 2 * p * vd["in_pixels"] * d + vd["depth"] * per_block + merger


def decoder_flops(td: dict, seq_len: int, lora_r: int = 16, checkpointing: bool = False) -> float:
    """Training FLOPs of the decoder layers for one sequence of seq_len tokens (its own causal attention)."""
    t = seq_len
    shapes = decoder_linear_shapes(td)
    linear = sum(a * b for a, b in shapes.values())
    lora = sum(lora_r * (a + b) for name, (a, b) in shapes.items() if name in QWEN_LORA_MODULES)
    attn_fwd = 2 * t * t * td["heads"] * td["head_dim"]  # QK^T and AV, causal half
    fwd = 2 * linear * t + 2 * lora * t + attn_fwd
    train = 4 * linear * t + 6 * lora * t + 3 * attn_fwd
    return td["layers"] * (train + (fwd if checkpointing else 0))


def head_flops(td: dict, positions: int) -> float:
    return 4 * td["hidden"] * td["vocab"] * positions


def step_flops(config: dict, samples: list[dict], labels_only: bool = False, checkpointing: bool = False) -> dict:
    """FLOPs over `samples` (each {"tokens": sequence length, "supervised": n, "patches": [per image]})."""
    td, vd = text_dims(config), vision_dims(config)
    vision = sum(vision_forward_flops(vd, p) for s in samples for p in s["patches"])
    decoder = sum(decoder_flops(td, s["tokens"], checkpointing=checkpointing) for s in samples)
    head = sum(head_flops(td, s["supervised"] if labels_only else s["tokens"]) for s in samples)
    total = vision + decoder + head
    return {"vision_tower": vision, "decoder_layers": decoder, "lm_head": head, "total": total,
            "shares": {"vision_tower": vision / total, "decoder_layers": decoder / total, "lm_head": head / total}}


def mfu_flops(config: dict, samples: list[dict]) -> float:
    """The issue's MFU numerator: 4 x LLM parameters x tokens + the vision forward FLOPs."""
    td, vd = text_dims(config), vision_dims(config)
    llm = decoder_parameters(td) + td["hidden"] * td["vocab"]
    tokens = sum(s["tokens"] for s in samples)
    return 4 * llm * tokens + sum(vision_forward_flops(vd, p) for s in samples for p in s["patches"])


def compare(small: dict, reference: dict, samples: list[dict]) -> dict:
    """Both models' FLOP shares on the same samples (plain step: all-position logits; and labels-only)."""
    out = {}
    for name, labels_only in (("plain_step", False), ("labels_only_step", True)):
        a, b = step_flops(small, samples, labels_only), step_flops(reference, samples, labels_only)
        out[name] = {"small": a["shares"], "reference": b["shares"],
                     "max_share_difference_points": 100 * max(abs(a["shares"][k] - b["shares"][k])
                                                              for k in a["shares"])}
    td = text_dims(small)
    out["small_parameters"] = {"decoder_linear": decoder_parameters(td), "lm_head": td["hidden"] * td["vocab"]}
    return out
