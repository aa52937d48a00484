"""An index folder: manifest.json, paths.txt (one image path a line, row i = vector i), parts/ (embeddings in
numbered .npy chunks while building) and index.faiss once complete. Every file is written whole (tmp + rename),
so a killed build leaves whole parts that a rerun keeps and a search can already use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import VlmtuneError

MANIFEST, PATHS, PARTS, INDEX = "manifest.json", "paths.txt", "parts", "index.faiss"
KINDS = ("flat", "ivf", "hnsw")


def write_atomic(path: Path, write) -> None:
    """`write(tmp_path)` then rename over `path`: the file is there whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmtuneError(f"{folder} is not an image index (no {MANIFEST}); build one with `vlmtune index build`") from None
    except (OSError, ValueError) as e:
        raise VlmtuneError(f"cannot read {folder / MANIFEST}: {e}; rebuild the index with --overwrite") from None


def read_paths(folder: Path) -> list[str]:
    return (folder / PATHS).read_text(encoding="utf-8").splitlines()


def part_path(folder: Path, number: int) -> Path:
    return folder / PARTS / f"part-{number:06d}.npy"


def save_part(folder: Path, number: int, vectors: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, vectors.astype("float32"))

    write_atomic(part_path(folder, number), write)


def done_parts(folder: Path, total: int, chunk: int, count: int) -> list[int]:
    """Numbers of the parts already written whole, each of the right row count (a rerun keeps them)."""
    done = []
    for number in range(total):
        path = part_path(folder, number)
        if path.is_file():
            rows = np.load(path, mmap_mode="r").shape[0]
            if rows == min(chunk, count - number * chunk):
                done.append(number)
    return done


def load_vectors(folder: Path, manifest: dict) -> tuple[np.ndarray, int]:
    """The embeddings of the leading whole parts (a partial index searches the images embedded so far) and how
    many images that covers."""
    chunk, count = manifest["chunk"], manifest["count"]
    parts = []
    for number in range((count + chunk - 1) // chunk):
        path = part_path(folder, number)
        if not path.is_file():
            break
        parts.append(np.load(path))
    vectors = np.concatenate(parts) if parts else np.zeros((0, manifest["dim"]), dtype="float32")
    return vectors, len(vectors)
