"""PEFT LoRA adapter weights -> per base-weight edits, with every name and shape checked against the base.

A module in `modules_to_save` (and an embedding saved whole) is stored as the full tensor under
`base_model.model.<module>.<param>` (or `.base_layer.<param>`); the LoRA matrices are named as adapter_files
describes. The update of a weight is scale * B @ A (its transpose for embeddings) with scale = alpha / r, or
alpha / sqrt(r) with rsLoRA; `alpha_pattern` / `rank_pattern` override alpha and r per module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter_files import (
    ADAPTER_WEIGHTS,
    PREFIX,
    lora_part,
    pattern_value,
    read_adapter_config,
    read_adapter_files,
)
from ..errors import VlmtuneError
from .io import TensorInfo


@dataclass
class LoraPair:
    module: str  # module path in the model, e.g. model.language_model.layers.0.mlp.down_proj
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False

    def delta(self) -> torch.Tensor:
        """The weight update, float32, in the base weight's layout."""
        d = self.b.float() @ self.a.float()
        return (d.T if self.embedding else d) * self.scale


@dataclass
class Adapter:
    folder: Path
    config: dict
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # model param name (`<module>.weight`) -> pair
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # model param name -> full tensor

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    def describe(self) -> str:
        rs = "rsLoRA " if self.config.get("use_rslora") else ""
        whole = f", {len(self.replacements)} whole tensors (modules_to_save)" if self.replacements else ""
        return (f"{rs}LoRA r{self.rank} alpha {self.config.get('lora_alpha')}, {len(self.pairs)} modules{whole}")


def read_adapter(folder: Path) -> Adapter:
    """Parse adapter_config.json and adapter_model.safetensors; refuse what a plain LoRA merge cannot express."""
    config = read_adapter_config(folder)
    if config.get("peft_type", "LORA") != "LORA":
        raise VlmtuneError(f"{folder}: a {config.get('peft_type')} adapter cannot be merged; only LoRA adapters")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "lora_bias") if config.get(k)]
    if unsupported:
        raise VlmtuneError(f"{folder}: adapters with {', '.join(unsupported)} are not supported by merge-adapter")
    config, weights = read_adapter_files(folder)
    adapter = Adapter(folder, config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    strange = []
    for key, tensor in weights.items():
        if not key.startswith(PREFIX):
            strange.append(key)
            continue
        name = key[len(PREFIX):]
        if (found := lora_part(name)) is not None:
            module, part = found
            halves.setdefault(module, {})[part] = tensor
        elif re.search(r"\.(lora_\w+|trainable_tokens_\w+|lora_magnitude_vector)(\.|$)", name):
            strange.append(key)
        else:  # a whole tensor: modules_to_save, or an embedding saved with save_embedding_layers
            adapter.replacements[name.replace(".base_layer.", ".")] = tensor
    if strange:
        raise VlmtuneError(f"{folder}: {len(strange)} adapter tensors of a kind merge-adapter does not handle, "
                           f"e.g. {strange[0]}")
    for module, parts in halves.items():
        adapter.pairs[module + ".weight"] = _pair(module, parts, config, folder)
    if not adapter.pairs and not adapter.replacements:
        raise VlmtuneError(f"{folder}/{ADAPTER_WEIGHTS} holds no LoRA weights")
    return adapter


def _pair(module: str, parts: dict[str, torch.Tensor], config: dict, folder: Path) -> LoraPair:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a = parts.get("lora_embedding_A" if embedding else "lora_A")
    b = parts.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None:
        raise VlmtuneError(f"{folder}: {module} has only one of its two LoRA matrices")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise VlmtuneError(f"{folder}: {module}: LoRA matrices of shapes {tuple(a.shape)} and {tuple(b.shape)} "
                           "do not form a linear-layer update (convolution LoRA is not supported)")
    r = a.shape[0]  # agrees with adapter_config.json (read_adapter_files)
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r)))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraPair(module, a, b, scale, embedding)


@dataclass
class BaseLayout:
    """The base checkpoint's tensors and how their stored names map to the model's parameter names."""

    tensors: list[TensorInfo]
    to_model: dict[str, str]  # stored name -> model parameter name
    model_shapes: dict[str, tuple[int, ...]]  # model parameter name -> shape (meta model)
    tied: list[list[str]]  # groups of model parameter names sharing one tensor
    fused: set[str]  # stored names that a converter (not a plain renaming) turns into model parameters
    rename: object = None  # stored name -> model name, as transformers renames at load time

    def __post_init__(self):
        self._stored = {model: stored for stored, model in self.to_model.items()}

    def stored_name(self, model_name: str) -> str | None:
        return self._stored.get(model_name)


def base_layout(config, tensors: list[TensorInfo], model_class) -> BaseLayout:
    """Build the model (of `model_class`) on the meta device (no memory) and map stored names with transformers'
    own renamings."""
    with torch.device("meta"):
        model = model_class._from_config(config)
    state = model.state_dict()
    rename, fused = _renamer(model, state)
    to_model = {t.name: rename(t.name) for t in tensors}
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied = [names for names in groups.values() if len(names) > 1]
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    return BaseLayout(tensors, to_model, shapes, tied, {t.name for t in tensors if t.name in fused}, rename)


def _renamer(model, state):
    """A function mapping a stored (checkpoint) name to the model's parameter name, and fused names."""
    fused: set[str] = set()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # older/newer transformers without the conversion API: names are stored as-is
        return (lambda name: name), fused
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(name: str) -> str:
        new, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if converter is not None:
            fused.add(name)
        return new

    return rename, fused


@dataclass
class Edit:
    """What happens to one model parameter: replaced whole and/or updated by LoRA pairs."""

    replacement: torch.Tensor | None = None
    pairs: list[LoraPair] = field(default_factory=list)

    def apply(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = (self.replacement if self.replacement is not None else weight).float()
        for pair in self.pairs:
            w = w + pair.delta()
        return w.to(dtype)


def plan_edits(adapter: Adapter, layout: BaseLayout) -> dict[str, Edit]:
    """model parameter name -> Edit; every adapter target must exist in the base with a matching shape."""
    edits: dict[str, Edit] = {}
    missing, wrong = [], []
    for name, tensor in adapter.replacements.items():
        target = _model_name(name, layout)
        if target is None:
            missing.append(name)
        elif tuple(tensor.shape) != layout.model_shapes[target]:
            wrong.append(f"{name}: adapter {tuple(tensor.shape)}, base {layout.model_shapes[target]}")
        else:
            edits.setdefault(target, Edit()).replacement = tensor
    for name, pair in adapter.pairs.items():
        target = _model_name(name, layout)
        if target is None:
            missing.append(pair.module)
            continue
        shape = layout.model_shapes[target]
        update = (pair.a.shape[1], pair.b.shape[0]) if pair.embedding else (pair.b.shape[0], pair.a.shape[1])
        if len(shape) != 2 or tuple(shape) != update:
            wrong.append(f"{pair.module}: LoRA update {update}, base weight {shape}")
            continue
        edits.setdefault(target, Edit()).pairs.append(pair)
    if missing:
        raise VlmtuneError(f"{len(missing)} adapter target(s) do not exist in the base model, e.g. "
                           f"{', '.join(missing[:3])}; was the adapter trained on a different model?")
    if wrong:
        raise VlmtuneError(f"the base model's shapes do not match the adapter ({len(wrong)} tensors), e.g. "
                           f"{wrong[0]}; was the adapter trained on a different model size?")
    fused = [n for n in edits if (s := layout.stored_name(n)) is not None and s in layout.fused]
    if fused:
        raise VlmtuneError(f"{fused[0]} is stored fused with other weights in the base checkpoint; "
                           "merge-adapter cannot merge it shard by shard")
    return edits


def _model_name(name: str, layout: BaseLayout) -> str | None:
    """The model parameter an adapter name refers to (adapters saved against stored names are mapped too)."""
    if name in layout.model_shapes:
        return name
    renamed = layout.to_model.get(name)
    return renamed if renamed in layout.model_shapes else None
