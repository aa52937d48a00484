"""The merged tensors streamed into output shards: one base shard open at a time, each edited tensor checked finite."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import VlmtuneError
from .io import INDEX_FILE, SINGLE_FILE, ShardWriter, TensorInfo, nbytes, plan_shards, shard_name, write_index
from .lora import BaseLayout, Edit


def output_tensors(tensors: list[TensorInfo], layout: BaseLayout, edits: dict[str, Edit], dtype):
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


def write_shards(folder: Path, base_dir: Path, outputs, edits: dict[str, Edit], max_shard: int,
                 progress: bool) -> int:
    """The output tensors (output_tensors) into shards of at most max_shard bytes and their index; the count."""
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
    index = base_dir / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    return {source: SINGLE_FILE for _, _, _, (source, _) in outputs}
