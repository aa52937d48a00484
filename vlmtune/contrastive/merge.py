"""Fold a contrastive LoRA adapter into its base: a plain CLIPModel / SiglipModel folder (AutoModel loads it).

vlmtune.merge streams shards for multi-billion-parameter VLMs and checks them against the VLM family's logits;
a dual encoder is small (CLIP-B/32: 151M parameters), so PEFT's merge_and_unload in memory is enough here, and the
check compares embeddings of a probe image and text before and after."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..embedding import embed_images, embed_texts, load_embedding_model
from ..errors import VlmtuneError
from ..run_metadata import read_metadata, write_metadata


def _probe(model, processor):
    from PIL import Image

    image = Image.new("RGB", (64, 48), (200, 60, 30))
    return embed_images(model, processor, [image]), embed_texts(model, processor, ["a red square", "a blue circle"])


def merge_contrastive(adapter_dir, out, force: bool = False, atol: float = 1e-4, log=print) -> Path:
    """Write base + adapter as one model folder at `out` (refused when `out` exists, unless `force`)."""
    import numpy as np

    adapter_dir, out = Path(adapter_dir), Path(out).absolute()
    if out.exists() and not force:
        raise VlmtuneError(f"{out} exists; choose another folder or pass --force to replace it")
    if out.resolve() == adapter_dir.resolve():
        raise VlmtuneError(f"{out} is the adapter folder itself; write the merged model to another folder")
    model, processor, family = load_embedding_model(adapter_dir)
    want = _probe(model, processor)
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        reloaded = family.load_class().from_pretrained(tmp, dtype=torch.float32).eval()
        got = _probe(reloaded, processor)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(want, got, strict=True))
        if diff > atol:
            raise VlmtuneError(f"the merged model's embeddings differ from base + adapter by {diff:.2e} "
                               f"(> {atol}); nothing was written to {out}")
        meta = read_metadata(adapter_dir)
        write_metadata(tmp, {**{k: v for k, v in meta.items() if k != "files"}, "merged_from": str(adapter_dir),
                             "check": {"max_embedding_diff": diff}, "files": sorted(p.name for p in tmp.iterdir())})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} ({family.model_class}; embeddings within {diff:.1e} of base + adapter)")
    return out
