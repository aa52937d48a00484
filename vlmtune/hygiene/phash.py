"""Perceptual hashes of image files (imagehash's pHash), each computed once per file content.

pHash is the 64-bit sign pattern of the lowest 8x8 DCT frequencies of the 32x32 grey image: resizing and
re-encoding (JPEG q30) move a copy by 0-4 bits, a crop of 2-3% of each side by about 4-10, while distinct
pictures sat 14 or more apart (200 of tests/test_hygiene.py's pictures, 19,900 pairs). It sees luminance only:
two images that differ only in hue (a red and a blue square on white) hash alike, so each hash carries a colour
signature too (the image's mean colours on a 4x4 grid): two images are near-duplicates only when their colours
agree as well (copies: within a few levels; a red and a blue square in the same place: a hundred or more).

Hashes are remembered by the file's content digest in `$VLMTUNE_CACHE/hygiene/phash-v1.json` (digests themselves
by size and mtime, shared with the vision cache), so a second run decodes only new or changed files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.images import ImageProblem, cache_root, load_rgb

HASH_BITS = 64
COLOUR_GRID = 4  # cells per side of the colour signature
_CACHE_NAME = "phash-v2.json"  # bump when the hash or its input changes


def cache_dir() -> Path:
    return cache_root() / "hygiene"


def _phash(path: str) -> str:
    """`<pHash hex>:<colour signature hex>` of an image file (the mean RGB of each cell of a 4x4 grid)."""
    import imagehash
    from PIL import Image

    image = load_rgb(path)
    colours = image.resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX).tobytes()
    return f"{imagehash.phash(image)}:{colours.hex()}"


def colour_gap(a: str, b: str) -> int:
    """The largest difference (0-255) of one colour channel in one grid cell between two images' signatures."""
    ca = np.frombuffer(bytes.fromhex(a.partition(":")[2]), dtype=np.uint8).astype(np.int16)
    cb = np.frombuffer(bytes.fromhex(b.partition(":")[2]), dtype=np.uint8).astype(np.int16)
    return int(np.abs(ca - cb).max())


def as_bits(hex_hashes: Iterable[str]) -> np.ndarray:
    """(n, 8) uint8 rows of the 64-bit pHashes of `_phash`'s strings (faiss' binary layout)."""
    hexes = [h.partition(":")[0] for h in hex_hashes]
    if not hexes:
        return np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(len(hexes), HASH_BITS // 8).copy()


class HashCache:
    """Content digest -> pHash (hex), read once and written whole (atomically) when anything was added."""

    def __init__(self, folder: Path | None = None):
        from ..vision_cache import MediaHasher
        from ..vision_cache import cache_root as vision_root

        self.path = (folder or cache_dir()) / _CACHE_NAME
        self.digests = MediaHasher(vision_root() / "media-digests.json")
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self._added = False

    def put(self, digest: str, value: str) -> None:
        self.known[digest] = value
        self._added = True

    def save(self) -> None:
        self.digests.save()
        if not self._added:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(self.known, f)
            os.replace(tmp, self.path)
        except OSError:  # an unwritable cache only costs the next run its head start
            pass
        self._added = False


def hash_images(paths: Iterable[str], cache: HashCache | None = None, workers: int | None = None,
                progress: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """({path: pHash hex}, {path: why it could not be hashed}) for every distinct path."""
    cache = cache or HashCache()
    unique = list(dict.fromkeys(paths))
    hashes, failed, todo = {}, {}, {}
    for path in unique:
        try:
            digest = cache.digests.file(path)
        except OSError as e:
            failed[path] = f"cannot be read ({e.strerror or e})"
            continue
        if digest in cache.known:
            hashes[path] = cache.known[digest]
        else:
            todo.setdefault(digest, []).append(path)
    workers = workers or min(8, len(os.sched_getaffinity(0)))

    def one(digest: str):
        try:
            return digest, _phash(todo[digest][0]), None
        except (ImageProblem, OSError) as e:
            return digest, None, str(e)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow decodes and resizes outside the GIL
        results = pool.map(one, list(todo))
        for digest, value, problem in tqdm(results, total=len(todo), desc="hashing images", unit="image",
                                           disable=not progress or len(todo) < 200):
            for path in todo[digest]:
                if value is None:
                    failed[path] = problem
                else:
                    hashes[path] = value
            if value is not None:
                cache.put(digest, value)
    cache.save()
    return hashes, failed
