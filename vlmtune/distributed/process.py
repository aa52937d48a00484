"""The process-wide state a DeepSpeed run needs, set in one explicit step by the training entry point.

Nothing else in vlmtune sets it: building a config, a plan or the Trainer's arguments leaves the process as it
was (the Trainer's arguments do register their own copy of the DeepSpeed config with transformers)."""

from __future__ import annotations

import os

from .launch import process_group_env


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
