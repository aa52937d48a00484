"""`vlmtune index search`: the images nearest a text query, under the model the index was built with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import store


@dataclass
class ImageIndex:
    folder: Path
    manifest: dict
    paths: list[str]
    index: object  # a faiss index
    complete: bool
    _model: tuple | None = None

    @property
    def model(self) -> tuple:
        """(model, processor, family) of the index's model, loaded on first use."""
        if self._model is None:
            from ..embedding import load_embedding_model
            from .build import default_device

            self._model = load_embedding_model(self.manifest["model"], device=default_device())
        return self._model

    def search_vectors(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row indices) of the k nearest rows of each query vector (-1 where fewer exist)."""
        return self.index.search(np.ascontiguousarray(queries, dtype="float32"), k)

    def search(self, query: str, k: int = 5) -> list[tuple[str, float]]:
        """The k images nearest the text `query`: (path, cosine score), best first."""
        from ..embedding import embed_texts

        model, processor, _ = self.model
        scores, rows = self.search_vectors(embed_texts(model, processor, [query]), k)
        return [(self.paths[r], float(s)) for s, r in zip(scores[0], rows[0], strict=True) if r >= 0]


def load_index(folder, nprobe: int = 16, ef_search: int = 64) -> ImageIndex:
    """An index folder, ready to search. One whose build was stopped searches the images embedded so far
    (exactly, `complete` False)."""
    import faiss

    from .build import faiss_index

    folder = Path(folder)
    manifest = store.read_manifest(folder)
    paths = store.read_paths(folder)
    if manifest.get("complete") and (folder / store.INDEX).is_file():
        index, complete = faiss.read_index(str(folder / store.INDEX)), True
    else:
        vectors, count = store.load_vectors(folder, {**manifest, "dim": manifest.get("dim") or 1})
        index, complete, paths = faiss_index(vectors, "flat"), False, paths[:count]
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search
    return ImageIndex(folder, manifest, paths, index, complete)


def search_index(folder, query: str, k: int = 5) -> list[tuple[str, float]]:
    return load_index(folder).search(query, k)
