"""`merge-adapter`: fold a LoRA adapter into its full-precision base, shard by shard, into a complete model folder.

Memory stays near one base shard plus the adapter: each base shard is opened with safetensors'
`safe_open`, each tensor read, updated (scale * B @ A in float32) and streamed into output shards whose
headers are written first. The folder gets the base's config and generation config and the adapter
folder's processor files byte for byte, is written beside `out` under a hidden name, checked against
base + adapter (see check), and only then renamed to `out`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..disk import human_size
from ..errors import VlmtuneError
from ..inference.load import dtype_named, local_base, locate_base, model_family
from . import folder as merge_folder
from .check import parity_check
from .io import nbytes, parse_size, read_checkpoint_index
from .lora import base_layout, plan_edits, read_adapter
from .shards import output_tensors, write_shards

BASE = "the base model folder"


@dataclass
class MergeResult:
    output_dir: Path
    num_shards: int
    total_bytes: int
    merged_modules: int
    check: dict | None = None
    notes: list[str] = field(default_factory=list)


def merge_adapter(adapter_dir, out, base: str | None = None, dtype: str | None = None, shard_size="5GB",
                  force: bool = False, check: bool = True, log=print, progress: bool = True) -> MergeResult:
    """Merge the adapter in `adapter_dir` into its base and write a standalone model folder at `out`."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    meta = merge_folder.check_adapter_folder(adapter_dir, base)
    base_ref = base or meta["base_model"]
    local = local_base(base_ref)  # a base still to be fetched is checked once it is here
    merge_folder.check_out(out, {"the adapter folder": adapter_dir, **({BASE: local} if local else {})}, force)
    max_shard = parse_size(shard_size)
    out_dtype = dtype_named(dtype)
    base_dir = locate_base(base_ref)
    merge_folder.check_apart(out, base_dir, BASE)
    config, family = _base_config(base_dir, base_ref, meta)
    tensors = read_checkpoint_index(base_dir)
    adapter = read_adapter(adapter_dir)
    layout = base_layout(config, tensors, family.load_class())
    edits = plan_edits(adapter, layout)
    outputs, untied = output_tensors(tensors, layout, edits, out_dtype)
    total = sum(nbytes(d, s) for _, d, s, _ in outputs)
    log(f"adapter: {adapter_dir} ({adapter.describe()}, family {family.name})")
    log(f"base: {base_ref} ({base_dir}, {len({t.shard for t in tensors})} shard(s), "
        f"{human_size(sum(nbytes(t.dtype, t.shape) for t in tensors))})")
    notes = []
    if meta.get("quantization", "none") != "none":
        notes.append(f"the adapter was trained on a {meta['quantization']} quantized base: it is merged into the "
                     "full-precision base weights, never into quantized ones")
    if untied:
        notes.append(f"the adapter changes {', '.join(untied)}, which the base ties together: the merged model "
                     "stores them separately (tie_word_embeddings: false)")
    for note in notes:
        log("note: " + note)
    merge_folder.remove_leftovers(out, log)
    merge_folder.check_disk(out.parent, total)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        num_shards = write_shards(tmp, base_dir, outputs, edits, max_shard, progress)
        merge_folder.write_config(tmp, base_dir, out_dtype, bool(untied))
        merge_folder.copy_processor(adapter_dir, tmp)
        result = MergeResult(out, num_shards, total, sum(len(e.pairs) for e in edits.values()), None, notes)
        if check:
            edited = [d for _, d, _, (_, name) in outputs if name in edits]
            weights_dtype = min(edited, key=lambda d: torch.finfo(d).bits) if edited else torch.float32
            result.check = parity_check(tmp, base_dir, adapter_dir, meta, weights_dtype, log=log)
        merge_folder.write_merged_metadata(tmp, meta, {
            "adapter": str(adapter_dir), "base_model": base_ref, "base_path": str(base_dir),
            "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else "as stored in the base",
            "lora": adapter.describe(), "merged_modules": result.merged_modules, "notes": notes,
            "check": result.check})
        merge_folder.move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} ({num_shards} shard(s), {human_size(total)}, "
        f"{result.merged_modules} LoRA modules merged)")
    return result


def _base_config(base_dir: Path, base_ref: str, meta: dict):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError) as e:
        raise VlmtuneError(f"cannot read the config of the base model {base_ref}: {e}") from None
    if getattr(config, "quantization_config", None):
        raise VlmtuneError(f"the base model {base_ref} is stored quantized; merge into the full-precision "
                           "base model (give it with --base)")
    return config, model_family(config, base_ref, meta)


__all__ = ["MergeResult", "merge_adapter"]
