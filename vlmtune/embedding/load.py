"""Load a dual encoder: a model folder / hub id / builtin tiny model, or a contrastive LoRA adapter folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VlmtuneError
from . import registry, tiny
from .registry import EmbeddingFamily

TEMPERATURE_FILE = "temperature.safetensors"  # logit_scale (and logit_bias) as trained beside the adapter


def is_adapter(path) -> bool:
    return (Path(str(path)) / "adapter_config.json").is_file()


def model_type_of(name_or_path: str) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(tiny.resolve(name_or_path)).model_type
    except (OSError, ValueError) as e:
        raise VlmtuneError(f"cannot read the model config of {name_or_path}: {e}") from None


def dual_encoder_family(ref) -> EmbeddingFamily | None:
    """The embedding family of `ref` when it is a dual encoder (a builtin tiny one, a model folder or cached hub id
    whose config's model_type a family handles, or a contrastive adapter on such a base); None for anything else
    (a VLM), read from config files alone and never from the network."""
    from transformers import AutoConfig

    text = str(ref)
    if text.startswith(tiny.BUILTIN_PREFIX):
        name = text[len(tiny.BUILTIN_PREFIX):]
        return next((f for f in registry.all_families() if f.tiny_name == name), None)
    folder = Path(text).expanduser()
    if is_adapter(folder):
        try:
            return dual_encoder_family(adapter_base(folder))
        except VlmtuneError:
            return None
    try:
        model_type = AutoConfig.from_pretrained(text, local_files_only=True).model_type
        return registry.for_model_type(model_type)
    except (OSError, ValueError, KeyError, VlmtuneError):
        return None


def load_base(name_or_path: str, dtype: torch.dtype | None = None, device: str | None = None,
              quantization=None):
    """(model, processor, family) of a full model, in eval mode; `quantization`: a recipe's quantization section
    (4-bit: the towers' linear layers, the projections kept in full precision)."""
    from transformers import AutoProcessor

    from ..quantization import disable_cpu_4bit_repacking, quantization_config

    family = registry.for_model_type(model_type_of(name_or_path), where=str(name_or_path))
    path = tiny.resolve(name_or_path)
    quant = quantization_config(quantization, family) if quantization is not None else None
    if quant is None:
        model = family.load_class().from_pretrained(path, dtype=dtype or torch.float32).to(device or "cpu")
    else:
        model = family.load_class().from_pretrained(path, dtype=dtype or torch.float32, quantization_config=quant,
                                                    device_map={"": device or "cpu"})
        if (device or "cpu") == "cpu":
            disable_cpu_4bit_repacking(model)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor, family


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter folder was trained on: vlmtune.json's base_model, else PEFT's record."""
    from ..adapter_files import read_adapter_config
    from ..run_metadata import read_metadata

    meta = read_metadata(adapter_dir)
    base = meta.get("base_model") or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise VlmtuneError(f"{adapter_dir} names no base model (vlmtune.json base_model or adapter_config.json "
                           "base_model_name_or_path); give the base model's folder")
    return base


def load_temperature(model, folder: Path) -> None:
    """Put the trained logit_scale / logit_bias saved in `folder` into `model` (nothing when there is no file)."""
    from safetensors.torch import load_file

    path = folder / TEMPERATURE_FILE
    if not path.is_file():
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        for name, value in load_file(path).items():
            getattr(base, name).copy_(value)


def load_embedding_model(path_or_adapter, dtype: torch.dtype | None = None, device: str | None = None,
                         base: str | None = None) -> tuple[object, object, EmbeddingFamily]:
    """(model, processor, family) in eval mode. An adapter folder gives a PeftModel over its base (its
    `disable_adapter()` is the base model) with the trained temperature; `base` overrides the recorded base."""
    from peft import PeftModel
    from transformers import AutoProcessor

    folder = Path(str(path_or_adapter))
    if not is_adapter(folder):
        return load_base(str(path_or_adapter), dtype, device)
    model, _, family = load_base(base or adapter_base(folder), dtype, device)
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    load_temperature(model, folder)
    return model.eval(), AutoProcessor.from_pretrained(folder), family
