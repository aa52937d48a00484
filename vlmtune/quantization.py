"""bitsandbytes settings shared by every model loader (the VLMs' and the dual encoders'): the quantization config of
a recipe's `quantization:` section, freezing a quantized model for LoRA, and a CPU repacking fix. Imports nothing
from the recipe layer, so a training method's own run (vlmtune/methods) may use it."""

from __future__ import annotations

import torch


def quantization_config(q, family, zero_stage: int = 0):
    """The bitsandbytes config of a recipe's quantization section `q` (None: full precision); `family`: anything
    with `skip_quantization` (the modules kept unquantized); `zero_stage`: the run's ZeRO stage (the plan's), which
    decides how the 4-bit weights are stored."""
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(family.skip_quantization))
    extra = {}
    if zero_stage == 3:
        # ZeRO-3 flattens and partitions the packed 4-bit weights with every other weight: same storage dtype
        extra["bnb_4bit_quant_storage"] = getattr(torch, q.compute_dtype)
    return BitsAndBytesConfig(
        **extra,
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        llm_int8_skip_modules=list(family.skip_quantization),
    )


def disable_cpu_4bit_repacking(model) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU kernel in eval mode, which breaks training afterwards."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_quantized(model, gradient_checkpointing: bool) -> None:
    """Freeze a 4/8-bit model for LoRA training without PEFT's upcast of every unquantized layer to fp32,
    which would double the memory and time of the bf16 vision tower for no gain in a frozen module."""
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
