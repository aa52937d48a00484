"""DeepSpeed for a contrastive run: the recipe's config filled and checked for this dual encoder
(distributed/deepspeed.py's for_run), and the process made ready for it before the model loads."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..embedding import tiny
from ..errors import VlmtuneError


def deepspeed_config(recipe, device: str, bf16: bool) -> dict | None:
    """The run's DeepSpeed config (None without DeepSpeed); VlmtuneError listing what DeepSpeed refuses."""
    if recipe.distributed.deepspeed == "none":
        return None
    from transformers import AutoConfig

    from ..distributed import deepspeed as dsc
    from ..distributed import world_size
    from ..modeling import Runtime

    model_config = AutoConfig.from_pretrained(tiny.resolve(recipe.model.name_or_path))
    runtime = Runtime(device.split(":")[0], torch.bfloat16 if bf16 else torch.float32, "sdpa")
    config, errors = dsc.for_run(recipe, runtime, model_config, world_size())
    if errors:
        raise VlmtuneError("the DeepSpeed set-up cannot run:\n" + "\n".join(f"  - {e}" for e in errors))
    return config


def prepare_process(recipe, config: dict | None) -> None:
    """distributed.process.prepare_deepspeed_process's process group and DeepSpeed communication for this run.
    The Hugging Face config it registers is dropped at once: the model is loaded whole, not partitioned as it is
    read (zero.Init cannot partition a 0-dim weight such as CLIP's logit_scale); the engine partitions it as
    training starts."""
    from ..distributed.process import prepare_deepspeed_process

    prepare_deepspeed_process(SimpleNamespace(recipe=recipe, deepspeed=config))
