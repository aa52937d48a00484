"""All pairs of 64-bit hashes within a Hamming distance, by faiss' binary indexes (both exact).

Up to FLAT_MAX hashes: `IndexBinaryFlat`'s range search, every pair's XOR-popcount in SIMD code (20,000 hashes:
about 0.8 s on one core), faster there than any index. Past it: multi-index hashing (`IndexBinaryMultiHash`), whose
time grows with n rather than n^2: the 64 bits are cut into m chunks; two hashes within distance d differ in some
chunk by at most floor(d / m) bits (pigeonhole), so looking up each chunk's bucket and its neighbours within that
many flipped bits (`nflip`) finds every pair, and faiss checks the full distance."""

from __future__ import annotations

import numpy as np

from .phash import HASH_BITS

FLAT_MAX = 100_000  # where the multi-index (about 200 us a query at distance 8) overtakes the flat scan


def _layout(distance: int) -> tuple[int, int, int]:
    """(chunks, bits per chunk, bits flipped per lookup) with chunks x (flips + 1) > distance: every pair is found.
    Few flips on wide chunks keeps buckets small (a 16-bit bucket holds n / 65,536 random hashes)."""
    for chunks in (4, 5, 6, 8):
        flips = distance // chunks
        if flips <= 2:
            return chunks, HASH_BITS // chunks, flips
    return 8, 8, distance // 8


def close_pairs(bits: np.ndarray, distance: int, method: str = "auto") -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) for i < j of every pair of rows of `bits` ((n, 8) uint8) within `distance`.

    `method`: auto (flat up to FLAT_MAX rows, else multi-index), flat or multihash."""
    import faiss

    n = len(bits)
    if n < 2:
        return []
    if method == "flat" or (method == "auto" and n <= FLAT_MAX):
        index = faiss.IndexBinaryFlat(HASH_BITS)
    else:
        chunks, width, flips = _layout(distance)
        index = faiss.IndexBinaryMultiHash(HASH_BITS, chunks, width)
        index.nflip = flips
    index.add(bits)
    limits, dist, found = index.range_search(bits, distance + 1)  # faiss keeps distances < radius
    rows = np.repeat(np.arange(n), np.diff(limits.astype(np.int64)))
    keep = found > rows
    return list(zip(rows[keep].tolist(), found[keep].tolist(), dist[keep].astype(np.int64).tolist(), strict=True))
