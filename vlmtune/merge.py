"""`merge-adapter`: fold a LoRA adapter into its full-precision base, shard by shard, into a complete model folder.

Memory stays near one base shard plus the adapter: each base shard is opened with safetensors'
`safe_open`, each tensor read, updated (scale * B @ A in float32) and streamed into output shards whose
headers are written first. The folder gets the base's config and generation config and the adapter
folder's processor files byte for byte, is written beside `out` under a hidden name, checked against
base + adapter (see merge_check), and only then renamed to `out`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import merge_folder
from .errors import VlmtuneError
from .merge_io import (
    ShardWriter,
    TensorInfo,
    nbytes,
    parse_size,
    plan_shards,
    read_checkpoint_index,
    shard_name,
    write_index,
)
from .merge_lora import BaseLayout, Edit, base_layout, plan_edits, read_adapter

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
    local = merge_folder.local_base(base_ref)  # a base still to be fetched is checked once it is here
    merge_folder.check_out(out, {"the adapter folder": adapter_dir, **({BASE: local} if local else {})}, force)
    max_shard = parse_size(shard_size)
    out_dtype = _dtype(dtype)
    base_dir = merge_folder.locate_base(base_ref)
    merge_folder.check_apart(out, base_dir, BASE)
    config, family = _base_config(base_dir, base_ref, meta)
    tensors = read_checkpoint_index(base_dir)
    adapter = read_adapter(adapter_dir)
    layout = base_layout(config, tensors, family.load_class())
    edits = plan_edits(adapter, layout)
    outputs, untied = _outputs(tensors, layout, edits, out_dtype)
    total = sum(nbytes(d, s) for _, d, s, _ in outputs)
    log(f"adapter: {adapter_dir} ({adapter.describe()}, family {family.name})")
    log(f"base: {base_ref} ({base_dir}, {len({t.shard for t in tensors})} shard(s), "
        f"{merge_folder.human_size(sum(nbytes(t.dtype, t.shape) for t in tensors))})")
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
        num_shards = _write_shards(tmp, base_dir, outputs, edits, max_shard, progress)
        merge_folder.write_config(tmp, base_dir, out_dtype, bool(untied))
        merge_folder.copy_processor(adapter_dir, tmp)
        result = MergeResult(out, num_shards, total, sum(len(e.pairs) for e in edits.values()), None, notes)
        if check:
            from .merge_check import parity_check

            edited = [d for _, d, _, (_, name) in outputs if name in edits]
            weights_dtype = min(edited, key=lambda d: torch.finfo(d).bits) if edited else torch.float32
            result.check = parity_check(tmp, base_dir, adapter_dir, meta, weights_dtype, log=log)
        merge_folder.write_metadata(tmp, meta, {
            "adapter": str(adapter_dir), "base_model": base_ref, "base_path": str(base_dir),
            "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else "as stored in the base",
            "lora": adapter.describe(), "merged_modules": result.merged_modules, "notes": notes,
            "check": result.check})
        merge_folder.move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} ({num_shards} shard(s), {merge_folder.human_size(total)}, "
        f"{result.merged_modules} LoRA modules merged)")
    return result


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return merge_folder.DTYPES[name]
    except KeyError:
        raise VlmtuneError(f"--dtype must be bf16, fp16 or fp32, got {name!r}") from None


def _base_config(base_dir: Path, base_ref: str, meta: dict):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError) as e:
        raise VlmtuneError(f"cannot read the config of the base model {base_ref}: {e}") from None
    if getattr(config, "quantization_config", None):
        raise VlmtuneError(f"the base model {base_ref} is stored quantized; merge into the full-precision "
                           "base model (give it with --base)")
    return config, merge_folder.model_family(config, base_ref, meta)


def _outputs(tensors: list[TensorInfo], layout: BaseLayout, edits: dict[str, Edit], dtype):
    """(stored name, dtype, shape, (source stored name, model name)) per output tensor; untied model names."""
    def cast(d):
        return dtype if dtype is not None and d.is_floating_point else d

    out = [(t.name, cast(t.dtype), t.shape, (t.name, layout.to_model[t.name])) for t in tensors]
    untied: list[str] = []
    by_model = {layout.to_model[t.name]: t for t in tensors}
    for group in layout.tied:
        if not any(name in edits for name in group):
            continue
        untied.extend(group)
        stored = next((by_model[n] for n in group if n in by_model), None)
        if stored is None:
            raise VlmtuneError(f"none of the tied weights {', '.join(group)} is stored in the base checkpoint")
        for name in group:
            if name in by_model:
                continue
            if layout.rename(name) != name:
                raise VlmtuneError(f"cannot store the untied weight {name} under a name the model loads")
            out.append((name, cast(stored.dtype), stored.shape, (stored.name, name)))
    return out, untied


def _write_shards(folder: Path, base_dir: Path, outputs, edits: dict[str, Edit], max_shard: int,
                  progress: bool) -> int:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    specs = [(name, d, s) for name, d, s, _ in outputs]
    shards = plan_shards(specs, max_shard)
    shard_of = _shard_files(base_dir, outputs)
    weight_map, total = {}, 0
    bar = tqdm(total=sum(nbytes(d, s) for _, d, s in specs), unit="B", unit_scale=True, desc="merging",
               disable=not progress)
    handle, handle_file = None, None
    try:
        for k, indices in enumerate(shards):
            name = shard_name(k, len(shards))
            writer = ShardWriter(folder / name, [specs[i] for i in indices])
            try:
                for i in indices:
                    out_name, dtype, shape, (source, model_name) = outputs[i]
                    if shard_of[source] != handle_file:  # one base shard open at a time
                        handle = safe_open(str(base_dir / shard_of[source]), framework="pt")
                        handle_file = shard_of[source]
                    tensor = handle.get_tensor(source)
                    edit = edits.get(model_name)
                    if edit is not None:
                        tensor = edit.apply(tensor, dtype)
                        _check_finite(tensor, model_name)
                    else:
                        tensor = tensor.to(dtype)
                    writer.write(out_name, tensor)
                    weight_map[out_name] = name
                    total += nbytes(dtype, shape)
                    bar.update(nbytes(dtype, shape))
                    del tensor
            finally:
                writer.file.close()
            writer.close()
    finally:
        handle = None
        bar.close()
    write_index(folder, weight_map, total)
    return len(shards)


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
    if bad:
        raise VlmtuneError(f"{name} has {bad} NaN or infinite values after merging in {tensor.dtype}: the base "
                           "weight or the adapter's update does not fit that dtype; merge with --dtype fp32")


def _shard_files(base_dir: Path, outputs) -> dict[str, str]:
    from .merge_io import INDEX_FILE, SINGLE_FILE

    index = base_dir / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    return {source: SINGLE_FILE for _, _, _, (source, _) in outputs}


