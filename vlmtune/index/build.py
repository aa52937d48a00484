"""`vlmtune index build`: embed every image with a dual encoder (or a contrastive adapter) into a FAISS index.

Embeddings go to disk a chunk at a time; a rerun with the same model and images keeps the chunks already written
and embeds the rest, so a killed build continues where it stopped. Exact inner product (cosine: the embeddings are
unit vectors) by default; `ivf` (inverted lists) or `hnsw` (graph) for large collections.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np

from ..errors import VlmtuneError
from . import store
from .sources import image_paths


def faiss_index(vectors: np.ndarray, kind: str = "flat", nlist: int | None = None, hnsw_m: int = 32):
    """A FAISS inner-product index holding `vectors` (float32 rows)."""
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        lists = nlist or max(1, min(int(4 * math.sqrt(len(vectors))), len(vectors) // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise VlmtuneError(f"--kind {kind!r}: one of {', '.join(store.KINDS)}")
    index.add(vectors)
    return index


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _identity(model: str, paths: list[str], kind: str) -> dict:
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return {"model": model, "paths_sha256": digest, "kind": kind}


def build_index(model: str, images, out, kind: str = "flat", batch_size: int = 64, chunk: int = 1024,
                fmt: str = "caption", image_root: str | None = None, overwrite: bool = False,
                nlist: int | None = None, progress: bool = True, log=print) -> Path:
    """Build (or continue building) the index of `images` (a folder or a data file) under `model` at `out`."""
    import faiss
    from tqdm.auto import tqdm

    from ..embedding import embed_images, load_embedding_model

    if kind not in store.KINDS:
        raise VlmtuneError(f"--kind {kind!r}: one of {', '.join(store.KINDS)}")
    out = Path(out)
    model = str(Path(model).absolute()) if Path(model).exists() else str(model)  # a folder: wherever it is run
    paths = image_paths(images, fmt, image_root)
    identity = _identity(model, paths, kind)
    if (out / store.MANIFEST).is_file():
        old = store.read_manifest(out)
        same = {k: old.get(k) for k in identity} == identity and old.get("chunk") == chunk
        if not same and not overwrite:
            raise VlmtuneError(f"{out} holds an index of other images, another model or kind ({old.get('model')}, "
                               f"{old.get('count')} images, {old.get('kind')}); pass --overwrite to replace it or "
                               "choose another --out")
        if not same or (overwrite and old.get("complete")):
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise VlmtuneError(f"{out} exists and is not an image index; choose another --out")
    (out / store.PARTS).mkdir(parents=True, exist_ok=True)
    total = (len(paths) + chunk - 1) // chunk
    done = set(store.done_parts(out, total, chunk, len(paths)))
    model_obj, processor, family = load_embedding_model(model, device=default_device())
    manifest = {**identity, "family": family.name, "count": len(paths), "chunk": chunk, "dim": None,
                "complete": False, "source": str(Path(images).absolute())}
    if not (out / store.PATHS).is_file():
        store.write_atomic(out / store.PATHS, lambda tmp: tmp.write_text("\n".join(paths) + "\n", encoding="utf-8"))
    if done:
        log(f"continuing {out}: {len(done)} of {total} chunk(s) already embedded")
    bar = tqdm(total=len(paths), initial=sum(min(chunk, len(paths) - n * chunk) for n in done), unit="img",
               desc="indexing", disable=not progress)
    for number in range(total):
        if number in done:
            continue
        chunk_paths = paths[number * chunk:(number + 1) * chunk]
        vectors = np.concatenate([embed_images(model_obj, processor, chunk_paths[i:i + batch_size], batch_size)
                                  for i in range(0, len(chunk_paths), batch_size)])
        store.save_part(out, number, vectors)
        manifest["dim"] = int(vectors.shape[1])
        store.write_json(out / store.MANIFEST, manifest)
        bar.update(len(chunk_paths))
    bar.close()
    vectors, _ = store.load_vectors(out, {**manifest, "dim": manifest["dim"] or 0})
    index = faiss_index(vectors, kind, nlist)
    store.write_atomic(out / store.INDEX, lambda tmp: faiss.write_index(index, str(tmp)))
    store.write_json(out / store.MANIFEST, {**manifest, "dim": int(vectors.shape[1]), "complete": True})
    log(f"wrote {out}: {len(paths)} images, {kind} index, dim {vectors.shape[1]} ({family.name})")
    return out
