"""A PEFT adapter folder's files, read and checked one way for merge, predict and the parity check.

Facts of PEFT's saved format used here: keys are `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) for linear layers, `.lora_embedding_A` (r, vocab) and `.lora_embedding_B`
(dim, r) for embeddings; `rank_pattern` / `alpha_pattern` override r and alpha per module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import VlmtuneError

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"  # PEFT's older format, read by predict (merge wants safetensors)
FIX = "re-train the adapter, or copy the folder again from where it was trained"


def read_adapter_files(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter's tensors: the file parses, every value is finite, and each LoRA
    matrix has the rank the config gives it."""
    config = read_adapter_config(folder)
    path = next((folder / n for n in (ADAPTER_WEIGHTS, ADAPTER_BIN) if (folder / n).is_file()), None)
    if path is None:
        raise VlmtuneError(f"the adapter folder {folder} has no {ADAPTER_WEIGHTS} (its trained weights); "
                           f"{FIX} (a complete vlmtune training run writes it)")
    weights = _read_weights(path)
    _check_finite(path, weights)
    _check_ranks(path, weights, config)
    return config, weights


def read_adapter_config(folder: Path) -> dict:
    """The folder's adapter_config.json as a dict; VlmtuneError naming the file when it is missing or unreadable."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise VlmtuneError(f"{path} is missing; an adapter folder needs it beside its weights")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VlmtuneError(f"{path} cannot be read ({e}); {FIX}") from None
    if not isinstance(config, dict):
        raise VlmtuneError(f"{path} is not a JSON object; {FIX}")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter file; a truncated or garbage file is an error naming it."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise VlmtuneError(f"{path} is not a readable adapter file ({reason}): it is truncated or corrupt; "
                           f"{FIX}") from None
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise VlmtuneError(f"{path} holds no tensors by name, as an adapter file does; {FIX}")
    return weights


def lora_part(name: str) -> tuple[str, str] | None:
    """(module, "lora_A" | "lora_B" | "lora_embedding_A" | "lora_embedding_B") for a LoRA matrix's name."""
    m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
    return (m.group(1) or m.group(3), m.group(2) or m.group(4)) if m else None


def pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module overrides: a key matches a module path that ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_finite(path: Path, weights: dict[str, torch.Tensor]) -> None:
    counts = {k: int((~torch.isfinite(t)).sum()) for k, t in weights.items() if t.is_floating_point()}
    bad = {k: n for k, n in counts.items() if n}
    if bad:
        first = next(iter(bad))
        raise VlmtuneError(f"{path}: {sum(bad.values())} adapter values are NaN or infinite ({len(bad)} of "
                           f"{len(weights)} tensors, e.g. {first}): the file is corrupt or training diverged; {FIX}")


def _check_ranks(path: Path, weights: dict[str, torch.Tensor], config: dict) -> None:
    """lora_A is (r, in) and lora_B (out, r) (lora_embedding_A/B likewise), r from the config's rank_pattern or r."""
    for key, tensor in weights.items():
        found = lora_part(key.removeprefix(PREFIX))
        if found is None or tensor.dim() < 2:
            continue
        module, part = found
        r = tensor.shape[0] if part.endswith("A") else tensor.shape[1]
        expected = pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
        if expected is not None and int(expected) != r:
            raise VlmtuneError(f"{path}: {key} has rank {r} but {ADAPTER_CONFIG} says {expected}: the weights and "
                               f"the config are from different adapters; {FIX}")
