"""The process-wide state a run needs, set in explicit steps by the training entry point: what DeepSpeed needs
(prepare_deepspeed_process), torch's thread count (set_thread_counts) and Liger's kernels (apply_liger_kernels).

Nothing else in vlmtune sets it: building a config, a plan or the Trainer's arguments leaves the process as it
was (the Trainer's arguments do register their own copy of the DeepSpeed config with transformers)."""

from __future__ import annotations

import os

import torch

from .. import liger
from ..config.schema import switch
from .launch import process_group_env

_STARTING_THREADS = torch.get_num_threads()  # torch's own count: a different one was set by the user (or by us)
_ours: int | None = None


def torch_threads() -> tuple[int, int]:
    """(torch's intra-op threads now, the count it started with, or the one set_thread_counts set last)."""
    return torch.get_num_threads(), _ours if _ours is not None else _STARTING_THREADS


def set_thread_counts(sizing, log=print) -> None:
    """Set torch's intra-op threads to the count loader_sizing chose (`sizing.threads`; None: the user's own
    OMP_NUM_THREADS / MKL_NUM_THREADS / torch.set_num_threads is kept). Process-wide: torch has one pool."""
    global _ours
    if sizing.threads is not None and sizing.threads != torch.get_num_threads():
        torch.set_num_threads(sizing.threads)
        _ours = sizing.threads
    log(sizing.line())


def apply_liger_kernels(model, plan, log=print) -> str:
    """Liger's kernels on the loaded model when the plan chose them (plan.runtime.liger). Process-wide: liger
    rebinds the norm / MLP classes and rotary functions of the family's transformers modules as well as patching
    the instance, so a model of that family built later in this process gets them too. Returns the line logged."""
    if not plan.runtime.liger:
        line = f"Liger kernels: off ({plan.runtime.liger_note})"
    else:
        line = liger.apply(model, plan.family, required=switch(plan.recipe.train.liger_kernel) == "true")
    log(line)
    return line


def prepare_deepspeed_process(plan):
    """Make this process ready for the plan's DeepSpeed run; call it before the Trainer's arguments and the model
    are built. Returns the registered Hugging Face DeepSpeed config: keep it until the model is loaded (None
    without DeepSpeed; `plan`: a preflight.Plan).

    Why each piece is process-wide, and needed before the model loads:
    - DeepSpeed and Accelerate read the process group from the environment: a single process outside any launcher
      gets a one-member group (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; values already set stay).
    - ZeRO-3's zero.Init reads the world size from DeepSpeed's communication layer while the model loads;
      Accelerate joins it on a GPU, not on a CPU, so it is joined here (an existing process group is reused).
    - `from_pretrained` partitions the weights as it reads them (zero.Init) only while a Hugging Face DeepSpeed
      config is registered; transformers holds it by a weak reference, hence the returned object.
    """
    if plan.deepspeed is None:
        return None
    for key, value in process_group_env(plan.recipe).items():
        os.environ.setdefault(key, value)
    import deepspeed
    from deepspeed import comm
    from transformers.integrations import HfDeepSpeedConfig

    if not comm.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)
    return HfDeepSpeedConfig(plan.deepspeed)
