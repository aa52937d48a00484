"""What a contrastive run trains, on disk: the PEFT adapter (LoRA and the projections' copies) and
temperature.safetensors. Written whole (every ZeRO-3 rank's slices gathered first) into a checkpoint or the run
folder, and read back into the training model to resume or to keep the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ..distributed.zero3 import gathered_adapter_state
from ..embedding.load import TEMPERATURE_FILE, load_temperature
from ..errors import VlmtuneError
from .model import temperature_state

ADAPTER_FILE = "adapter_model.safetensors"
_IN_PEFT = "base_model.model."  # where PeftModel.named_parameters() puts the wrapped model's own parameters


def trained_state(peft_model) -> dict[str, torch.Tensor] | None:
    """The trained weights gathered from every ZeRO-3 rank (None when the model is not partitioned).
    Collective under ZeRO-3: every rank calls it."""
    return gathered_adapter_state(peft_model)


def save_trained(folder: Path, peft_model, family, state: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter files and temperature.safetensors into `folder`; `state`: trained_state's result."""
    from safetensors.torch import save_file

    if state is None:
        peft_model.save_pretrained(folder)
        temperature = temperature_state(peft_model, family)
    else:
        peft_model.save_pretrained(folder, state_dict=state)
        temperature = temperature_state(peft_model, family, {n: state[_IN_PEFT + n] for n in family.temperature})
    save_file(temperature, Path(folder) / TEMPERATURE_FILE)


def load_trained(peft_model, folder: Path) -> None:
    """Put the adapter and temperature saved in `folder` (a checkpoint) into the training model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise VlmtuneError(f"{folder} holds no {ADAPTER_FILE}: it is not a checkpoint of a contrastive run; give "
                           "a checkpoint-N folder such a run saved, or train.resume_from_checkpoint: latest")
    result = set_peft_model_state_dict(peft_model, load_file(path))
    if result.unexpected_keys:
        raise VlmtuneError(f"{path} holds weights this model has no place for (e.g. {result.unexpected_keys[0]}): "
                           "it was saved from another model or lora settings; resume with the recipe that made it")
    load_temperature(peft_model, Path(folder))
