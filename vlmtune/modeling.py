"""Load the base model and processor, quantize, attach LoRA, and report what trains."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from . import families
from .config import FieldError, LoraConfig, Recipe
from .config.schema import switch
from .errors import VlmtuneError
from .families import Family
from .quantization import disable_cpu_4bit_repacking as _disable_cpu_4bit_repacking
from .quantization import prepare_quantized, quantization_config

BUILTIN_PREFIX = "builtin:"


def resolve_model_path(name_or_path: str) -> str:
    """A built-in tiny model's cache folder, else the id or path unchanged."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        from .demo import builtin_model_path

        return str(builtin_model_path(name_or_path[len(BUILTIN_PREFIX):]))
    return name_or_path


def load_model_config(recipe: Recipe):
    from transformers import AutoConfig

    m = recipe.model
    return AutoConfig.from_pretrained(resolve_model_path(m.name_or_path), revision=m.revision,
                                      trust_remote_code=m.trust_remote_code)


def family_for(recipe: Recipe, model_config) -> Family:
    if recipe.model.family != "auto":
        return families.get(recipe.model.family)
    return families.for_model_type(model_config.model_type)


@dataclass(frozen=True)
class Runtime:
    """What this machine will run: device kind, dtype, attention kernel."""

    device: str
    dtype: torch.dtype
    attn_implementation: str
    liger: bool = False  # Liger's kernels patch the model (liger.py: chosen while planning)
    liger_note: str = ""  # why they are on or off


def check_model(recipe: Recipe) -> tuple[list[FieldError], object, Family | None]:
    """Problems with the model choice on this machine (all at once), the model config, and its family."""
    errs: list[FieldError] = []
    m = recipe.model
    if m.name_or_path.startswith(BUILTIN_PREFIX):
        from .demo import BUILTIN_MODELS

        name = m.name_or_path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            return [FieldError("model.name_or_path", f"unknown built-in model {name!r}; built-in: "
                               f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")], None, None
    elif _looks_like_path(m.name_or_path) and not Path(m.name_or_path).expanduser().exists():
        return [FieldError("model.name_or_path", f"folder not found: {m.name_or_path}")], None, None
    try:
        config = load_model_config(recipe)
    except (OSError, ValueError) as e:
        if not m.trust_remote_code and _needs_remote_code(m.name_or_path, e):
            return [FieldError("model.name_or_path", f"{m.name_or_path} is loaded by its own Python code (config.json "
                               "auto_map), not by transformers: set model.trust_remote_code: true to load it (this "
                               "runs the Python code in that folder/repo; read it first)")], None, None
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        return [FieldError("model.name_or_path", f"cannot read the model config of {m.name_or_path!r}: {first}. "
                           "Give a local model folder or a Hugging Face id that is reachable (or cached)")], None, None
    try:
        family = family_for(recipe, config)
    except families.UnknownFamilyError as e:
        return [FieldError("model.family" if m.family != "auto" else "model.name_or_path", str(e))], config, None
    if m.family != "auto" and config.model_type not in family.model_types:
        errs.append(FieldError("model.family", f"{m.family} does not match the model's model_type "
                               f"{config.model_type!r}; use auto"))
    errs.extend(check_runtime(recipe, family))
    return errs, config, family


def _needs_remote_code(name_or_path: str, error: Exception) -> bool:
    """Whether loading failed for want of trust_remote_code: transformers says so, or config.json has auto_map."""
    if "trust_remote_code" in str(error):
        return True
    try:
        config = json.loads((Path(name_or_path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no local config.json, or not JSON: nothing says it needs remote code
        return False
    return isinstance(config, dict) and "auto_map" in config


def check_runtime(recipe: Recipe, family: Family) -> list[FieldError]:
    errs = []
    m, q = recipe.model, recipe.quantization
    cuda = torch.cuda.is_available() and not recipe.train.use_cpu
    if m.attn_implementation == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        errs.append(FieldError("model.attn_implementation", "flash_attention_2 needs the flash-attn package, which "
                               "is not installed: pip install 'vlmtune[flash]', or use sdpa (or auto)"))
    if m.attn_implementation == "flash_attention_2" and not cuda:
        errs.append(FieldError("model.attn_implementation", "flash_attention_2 needs a CUDA GPU; use sdpa (or auto)"))
    if m.attn_implementation == "flash_attention_2" and not takes_flash_attention(family):
        errs.append(FieldError("model.attn_implementation", f"{family.description} does not support flash_attention_2 "
                               f"(transformers' {family.model_class}); use sdpa (or auto)"))
    for key in ("video_min_pixels", "video_max_pixels"):
        if getattr(recipe.data, key) and not family.takes_video():
            errs.append(FieldError(f"data.{key}", f"{family.description} does not take video; remove it"))
    if recipe.data.on_overlong == "shrink_images" and family.pixels is None:
        errs.append(FieldError("data.on_overlong", f"shrink_images lowers the pixel bound of a sample's images, "
                               f"which {family.description} does not have (its images are sized by "
                               f"{family.size_knob or 'its image processor'}); use drop or error"))
    for key in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels"):
        value = getattr(recipe.data, key)
        if not value or (key.startswith("video") and not family.takes_video()):
            continue
        if family.pixels is None:
            errs.append(FieldError(f"data.{key}", f"{family.description} does not size images by pixel count; "
                                   f"its images are sized by {family.size_knob or 'its image processor'}; remove it"))
        elif value < family.pixels.factor**2:
            f = family.pixels.factor
            errs.append(FieldError(f"data.{key}", f"{family.description} resizes images to multiples of {f}x{f} "
                                   f"pixels, so a bound below {f * f} ({f}x{f}) cannot hold; got {value}"))
    if m.dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        errs.append(FieldError("model.dtype", f"this GPU ({torch.cuda.get_device_name()}) does not support "
                               "bfloat16; use float32 (or auto)"))
    for path, value in (("model.dtype", m.dtype), ("quantization.compute_dtype", q.compute_dtype)):
        if value == "float16" and family.fp16_overflows and (path == "model.dtype" or q.mode != "none"):
            errs.append(FieldError(path, f"float16 is known to overflow in {family.description}; use bfloat16 "
                                   "(or float32 on GPUs without bfloat16)"))
    if recipe.train.packing and family.packing_refused:
        errs.append(FieldError("train.packing", f"{family.description} cannot pack examples "
                               f"(Family.packing_refused: {family.packing_refused}); set train.packing: false"))
    if q.mode != "none" and not importlib.util.find_spec("bitsandbytes"):
        errs.append(FieldError("quantization.mode", f"{q.mode} needs bitsandbytes, which is not installed: "
                               "pip install 'vlmtune[gpu]', or set quantization.mode=none"))
    return errs


def runtime_for(recipe: Recipe, family: Family) -> Runtime:
    cuda = torch.cuda.is_available() and not recipe.train.use_cpu
    m = recipe.model
    if m.dtype != "auto":
        dtype = getattr(torch, m.dtype)
    elif cuda and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    elif cuda and not family.fp16_overflows:
        dtype = torch.float16
    else:
        dtype = torch.float32
    attn = m.attn_implementation
    if attn == "auto":
        flash = cuda and importlib.util.find_spec("flash_attn") and takes_flash_attention(family)
        attn = "flash_attention_2" if flash else "sdpa"
    return Runtime("cuda" if cuda else "cpu", dtype, attn)


def takes_flash_attention(family: Family) -> bool:
    """Whether the family's transformers class runs flash_attention_2 (some refuse it: it would drop a mask
    they need, e.g. bidirectional attention over image tokens)."""
    return bool(getattr(family.load_class(), "_supports_flash_attn", True))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def load_processor(recipe: Recipe, family: Family):
    """The model's processor, with the recipe's pixel bounds set on its image processor and its video settings
    (fps, frame cap, per-frame pixel bounds) on its video processor."""
    from transformers import AutoProcessor

    m, d = recipe.model, recipe.data
    processor = AutoProcessor.from_pretrained(resolve_model_path(m.name_or_path), revision=m.revision,
                                              trust_remote_code=m.trust_remote_code)
    from .data.video import apply_video_settings

    if family.pixels is not None:
        family.pixels.set(processor.image_processor, d.min_pixels, d.max_pixels)
    if family.takes_video():
        apply_video_settings(processor, family.pixels, d.video_fps, d.video_max_frames, d.video_min_pixels,
                             d.video_max_pixels)
    return processor


def pixel_bounds(processor, family: Family) -> dict | None:
    """The image processor's pixel bounds as vlmtune.json records them (None: the family has none)."""
    if family.pixels is None:
        return None
    low, high = family.pixels.get(processor.image_processor)
    return {"min_pixels": low, "max_pixels": high}


def load_base_model(plan):
    """The plan's base model (`plan`: a preflight.Plan), in its runtime's dtype and attention, quantized as the
    recipe says. Under ZeRO-3 the weights are partitioned as they load: distributed.prepare_deepspeed_process
    must have run."""
    m, runtime = plan.recipe.model, plan.runtime
    kwargs = dict(dtype=runtime.dtype, attn_implementation=runtime.attn_implementation, revision=m.revision,
                  trust_remote_code=m.trust_remote_code)
    quant = quantization_config(plan.recipe.quantization, plan.family, plan.zero_stage)
    if quant is not None:
        kwargs["quantization_config"] = quant
        # each process its own GPU (a launcher sets LOCAL_RANK). Under ZeRO-3 transformers refuses a device_map;
        # it loads quantized weights without zero.Init (on the current GPU) and DeepSpeed partitions them later
        if plan.zero_stage != 3:
            local = int(os.environ.get("LOCAL_RANK", "-1"))
            device = (local if local >= 0 else torch.cuda.current_device()) if runtime.device == "cuda" else "cpu"
            kwargs["device_map"] = {"": device}
    model = plan.family.load_class().from_pretrained(plan.model_path, **kwargs)
    if quant is not None and runtime.device == "cpu":
        _disable_cpu_4bit_repacking(model)
    return model


def lora_targets(model, family: Family, lo: LoraConfig) -> str:
    """A PEFT `target_modules` regex naming exactly the chosen linear layers, layer indices generalised."""
    names = set(lo.target_modules or family.default_lora_targets)
    chosen = []
    available = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        component = family.component_of(name)
        leaf = name.rsplit(".", 1)[-1]
        if component == "language" and not name.startswith("lm_head"):
            available.add(leaf)
        if component == "language" and leaf in names and not name.startswith("lm_head"):
            chosen.append(name)
        elif component == "vision" and lo.train_vision_tower:
            chosen.append(name)
        elif component == "projector" and (lo.train_projector or lo.train_vision_tower):
            chosen.append(name)
    unknown = sorted(names - available) if lo.target_modules else []
    if unknown:
        raise VlmtuneError(f"lora.target_modules: {', '.join(unknown)} match no linear layer of the language "
                           f"model; its linear layers are named {', '.join(sorted(available))}")
    if not chosen:
        return ""
    patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in chosen})
    return "^(?:" + "|".join(patterns) + ")$"


def attach_lora(model, plan):
    """The model with the recipe's LoRA adapter on the chosen layers (`plan`: a preflight.Plan)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    r = plan.recipe
    lo = r.lora
    if r.quantization.mode != "none":
        prepare_quantized(model, switch(r.train.gradient_checkpointing) != "false")  # auto: on (memory_probe.py)
    targets = lora_targets(model, plan.family, lo)
    if not targets:
        wanted = ", ".join(lo.target_modules or plan.family.default_lora_targets)
        raise VlmtuneError(f"lora.target_modules: no linear layer of the model is named {wanted}; "
                           "list the layer names of this model's language model")
    config = PeftLoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=targets,
                            modules_to_save=lo.modules_to_save or None, use_rslora=lo.use_rslora,
                            task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def trainable_report(model, family: Family) -> dict[str, tuple[int, int]]:
    """Per component: (trainable, total) parameter counts."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves each rank a slice: ds_numel is the whole
        n *= 2 * p.element_size() if p.__class__.__name__ == "Params4bit" else 1  # two 4-bit values a byte
        c = counts[family.component_of(name)]
        c[1] += n
        if p.requires_grad:
            c[0] += n
    return {k: (v[0], v[1]) for k, v in counts.items()}


def format_report(report: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'component':<10} {'trainable':>14} {'total':>16} {'%':>7}"]
    tt = ta = 0
    for comp in ("vision", "projector", "language", "other"):
        if comp not in report:
            continue
        t, a = report[comp]
        tt, ta = tt + t, ta + a
        lines.append(f"{comp:<10} {t:>14,} {a:>16,} {100 * t / max(a, 1):>6.2f}%")
    lines.append(f"{'all':<10} {tt:>14,} {ta:>16,} {100 * tt / max(ta, 1):>6.2f}%")
    return "\n".join(lines)
