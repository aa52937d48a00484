"""The systems compared: what each model argument is (read before any weights load, so a mismatch is named
first), and their replies for the same rows, batched as `predict` batches them.

`--against base` needs no second model: the adapter's PeftModel generates once as loaded and once inside
peft's `disable_adapter()`, which is the bare base model.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_files import ADAPTER_CONFIG, read_adapter_config
from ..errors import VlmtuneError
from ..inference.generation import encode, generate
from ..inference.load import Loaded, locate_base, model_family
from ..run_metadata import read_metadata


@dataclass(frozen=True)
class ModelInfo:
    ref: str  # as the user gave it
    kind: str  # "adapter" or "model"
    base: str  # the base model an adapter was trained on (a model: its own ref)
    family: str


def describe(ref, base: str | None = None) -> ModelInfo:
    """What `ref` is, from its config files alone; VlmtuneError naming a missing folder or base model."""
    from transformers import AutoConfig

    from ..modeling import resolve_model_path

    folder = Path(resolve_model_path(str(ref))).expanduser()
    if not folder.is_dir():
        raise VlmtuneError(f"model or adapter folder not found: {ref}")
    meta = read_metadata(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        base_ref = base or meta.get("base_model") or read_adapter_config(folder).get("base_model_name_or_path")
        if not base_ref:
            raise VlmtuneError(f"the adapter {ref} names no base model (vlmtune.json or {ADAPTER_CONFIG}); "
                               "give it with --base")
        model_dir, kind = locate_base(base_ref), "adapter"
    elif (folder / "config.json").is_file():
        base_ref, model_dir, kind = str(ref), folder, "model"
    else:
        raise VlmtuneError(f"{ref} is neither a model folder (config.json) nor an adapter folder ({ADAPTER_CONFIG})")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise VlmtuneError(f"cannot read the model config in {model_dir}: {e}") from None
    return ModelInfo(str(ref), kind, str(base_ref), model_family(config, str(base_ref), meta).name)


def check_against(main: ModelInfo, against: str, other: ModelInfo | None) -> None:
    """Refuse a comparison that cannot be made: `base` for a plain model, another family's model."""
    if against == "base" and main.kind != "adapter":
        raise VlmtuneError(f"--against base compares an adapter with its base model, but {main.ref} is a full "
                           "model; use --against none to score it alone, or --against PATH to compare it "
                           "with another model or adapter")
    if other is not None and other.family != main.family:
        what = f"an adapter of {main.base}" if main.kind == "adapter" else "a model"
        raise VlmtuneError(f"{main.ref} is {what} of the {main.family} family, but --against {other.ref} is of the "
                           f"{other.family} family (base {other.base}); compare models of one family, on the "
                           "same prompts")


def replies(loaded: Loaded, rows, *, batch_size: int, max_new_tokens: int, seed: int, desc: str,
            progress: bool = True, bare_base: bool = False) -> list[str]:
    """The model's greedy reply to each row's prompt (bare_base: with the adapter disabled), in row order."""
    from tqdm.auto import tqdm

    if bare_base and not hasattr(loaded.model, "disable_adapter"):
        raise VlmtuneError("the bare base model needs an adapter loaded on it (a PeftModel)")
    torch.manual_seed(seed)
    encoded = [encode(loaded, r.prompt) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i].input_ids))  # similar lengths together
    out: dict[int, str] = {}
    with (loaded.model.disable_adapter() if bare_base else nullcontext()), \
            tqdm(total=len(rows), desc=desc, unit=" rows", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out.update(zip(idx, generate(loaded, [encoded[i] for i in idx], max_new_tokens), strict=True))
            bar.update(len(idx))
    return [out[i] for i in range(len(rows))]
