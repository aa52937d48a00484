"""Decisions the main process makes alone and every other process receives.

Deciding where a run writes may move and delete files (finish an interrupted swap, remove an unfinished
replacement, finish a cut-short checkpoint publish); a process that looked at the folder meanwhile could see
another state and decide otherwise. So with more than one process the process group is started first, rank 0
decides, and the others receive its decision, or its error, which they raise too. Work split across the ranks
meets again in `gathered`: every rank's outcome, on every rank."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from .errors import VlmtuneError

T = TypeVar("T")
GROUP_TIMEOUT = timedelta(seconds=1800)  # TrainingArguments' ddp_timeout default: the Trainer uses this group


def decided_by_main(decide: Callable[[], T], cuda: bool = True) -> T:
    """`decide()` on rank 0, its result (or VlmtuneError) on every rank; a single process just calls it.
    `cuda`: the run may use the GPUs (train.use_cpu false): the group then uses NCCL, as the Trainer would."""
    import torch.distributed as dist

    from .distributed import world_size

    if world_size() <= 1:
        return decide()
    _start_group(cuda)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("decided", decide())
        except Exception as e:
            shared = e if isinstance(e, VlmtuneError) else VlmtuneError(
                f"the main process failed to prepare the output folder: {type(e).__name__}: {e}")
            dist.broadcast_object_list([("failed", shared)], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    outcome, value = box[0]
    if outcome == "failed":
        raise value
    return value


def gathered(value: T, cuda: bool = True) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank; `[value]` in a single process. Each rank
    must call it (a meeting point): `cuda` as for `decided_by_main`."""
    import torch.distributed as dist

    from .distributed import world_size

    if world_size() <= 1:
        return [value]
    _start_group(cuda)
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _start_group(cuda: bool) -> None:
    """The default process group, as Accelerate would start it a moment later (it reuses a started one)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    nccl = cuda and torch.cuda.is_available()
    if nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if nccl else "gloo", timeout=GROUP_TIMEOUT)
