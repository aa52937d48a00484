"""FAISS image indexes built with a dual encoder: `build_index`, `load_index` / `search_index`."""

from .build import build_index, faiss_index
from .search import ImageIndex, load_index, search_index

__all__ = ["ImageIndex", "build_index", "faiss_index", "load_index", "search_index"]
