"""Recipe checks of the distributed section, and of what DeepSpeed cannot run with the chosen quantization."""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import FieldError


def distributed_errors(recipe, check_paths: bool) -> list[FieldError]:
    """The distributed section of a `config.Recipe`, and the combinations with quantization DeepSpeed cannot run."""
    # imported here, not above: vlmtune.distributed imports torch, which `import vlmtune` does not
    from ..distributed import deepspeed as dsc

    errs: list[FieldError] = []
    dist, q = recipe.distributed, recipe.quantization
    ds = dist.deepspeed
    presets = ", ".join(dsc.PRESET_NAMES)
    config = None
    if dsc.is_preset(ds):
        config = dsc.load(ds)
    elif ds != "none":
        if not ds.endswith(".json"):
            close = difflib.get_close_matches(ds, dsc.PRESET_NAMES, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errs.append(FieldError("distributed.deepspeed", f"must be none, {presets} or the path of a DeepSpeed "
                                   f"JSON config, got {repr(ds)}{hint}"))
        elif check_paths:
            try:
                config = dsc.load(ds)
            except dsc.DeepSpeedConfigError as e:
                errs.append(FieldError("distributed.deepspeed", str(e)))
    if dist.node_rank is not None and dist.node_rank >= max(dist.num_nodes, 1):  # below 0: BOUNDS
        errs.append(FieldError("distributed.node_rank", f"must be in [0, num_nodes={dist.num_nodes}), got {dist.node_rank}"))
    if dist.hostfile:
        if check_paths and not Path(dist.hostfile).expanduser().is_file():
            errs.append(FieldError("distributed.hostfile", f"file not found: {dist.hostfile}"))
        if dist.launcher in ("torchrun", "accelerate"):
            errs.append(FieldError("distributed.hostfile", f"is read by the deepspeed launcher, not {dist.launcher}; "
                                   "set distributed.launcher=deepspeed (or auto), or give num_nodes, node_rank and "
                                   "master_addr and start vlmtune on every node"))
        if dist.node_rank is not None:
            errs.append(FieldError("distributed.node_rank", "is not used with a hostfile: the deepspeed launcher "
                                   "starts every node of the hostfile itself; remove one of them"))
        if ds == "none":
            errs.append(FieldError("distributed.hostfile", "needs distributed.deepspeed (zero2, zero3, ...): "
                                   "the hostfile is read by the deepspeed launcher"))
    if dist.launcher == "deepspeed" and ds == "none":
        errs.append(FieldError("distributed.launcher", "deepspeed needs distributed.deepspeed set (zero2, zero3, ...); "
                               "plain data parallel runs under torchrun"))
    if config is not None:
        stage = dsc.zero_stage(config)
        offload = dsc.offloads(config)
        if stage == 3 and q.mode == "8bit":
            errs.append(FieldError("quantization.mode", "8-bit (LLM.int8) weights cannot be partitioned by ZeRO-3; "
                                   "use quantization.mode=4bit (QLoRA) or distributed.deepspeed=zero2"))
        if q.mode == "4bit" and offload["param"]:
            errs.append(FieldError("distributed.deepspeed", "4-bit (QLoRA) with ZeRO-3 parameter offload is not "
                                   "supported (bitsandbytes' packed 4-bit weights and their quantization state are "
                                   "not made to be paged to the CPU and back); use zero3 without offload_param, "
                                   "or quantization.mode=none with zero3_offload"))
    return errs
