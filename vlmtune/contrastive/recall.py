"""Retrieval recall@k between images and their captions (several captions per image allowed), and the paired
bootstrap of two systems' recall differences on the same queries."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")  # image->text: the queries are the images; text->image: the captions


def query_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> dict[str, np.ndarray]:
    """{"i2t": one rank per image, "t2i": one rank per caption}: how many wrong candidates score at least as high
    as the query's best right one (0: found first; a tie counts against, so a constant model finds nothing).
    `text_image[j]` is the image index of caption j; scores are inner products (cosines for unit rows)."""
    scores = image_emb @ text_emb.T  # images x texts
    text_image = np.asarray(text_image)
    mine = text_image[None, :] == np.arange(len(image_emb))[:, None]  # images x texts: caption j is image i's
    own = np.where(mine, scores, -np.inf).max(axis=1)
    pair = scores[text_image, np.arange(len(text_image))]
    return {"i2t": ((scores >= own[:, None]) & ~mine).sum(axis=1),
            "t2i": ((scores.T >= pair[:, None]) & ~mine.T).sum(axis=1)}


def recall_from_ranks(ranks: dict[str, np.ndarray], ks=KS) -> dict[str, float]:
    """Keys `i2t_r@k`, `t2i_r@k` (k by k, image->text first): the fraction of queries ranked under k."""
    return {f"{d}_r@{k}": float((ranks[d] < k).mean()) for k in ks for d in DIRECTIONS}


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, ks=KS) -> dict[str, float]:
    """image->text: an image counts when any of its captions is among its k best texts; text->image: a caption
    counts when its image is among its k best images. Keys `i2t_r@k`, `t2i_r@k`."""
    return recall_from_ranks(query_ranks(image_emb, text_emb, text_image), ks)


def pair_ranks(model, processor, pairs, batch_size: int = 32, progress: bool = False) -> dict[str, np.ndarray]:
    """query_ranks of a loaded model on Pairs: every caption of every pair."""
    from ..embedding import embed_images, embed_texts

    texts = [c for p in pairs for c in p.captions]
    owner = [i for i, p in enumerate(pairs) for _ in p.captions]
    images = embed_images(model, processor, [p.image for p in pairs], batch_size, progress=progress)
    return query_ranks(images, embed_texts(model, processor, texts, batch_size, progress=progress), np.array(owner))


def pair_recall(model, processor, pairs, batch_size: int = 32) -> dict[str, float]:
    """recall_at_k of a loaded model on Pairs: every caption of every pair."""
    return recall_from_ranks(pair_ranks(model, processor, pairs, batch_size))


def recall_intervals(ranks_a: dict[str, np.ndarray], ranks_b: dict[str, np.ndarray], ks=KS, *,
                     resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, list[float]]:
    """{key: [low, high]}: the percentile interval of recall(b) - recall(a) over `resamples` resamples (with
    replacement) of each direction's queries, both systems scored on the same resampled queries (numpy Generator
    seeded by `seed`, as metrics.bootstrap does)."""
    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2 * 100
    out = {}
    for d in DIRECTIONS:
        a, b = ranks_a[d], ranks_b[d]
        if len(a) != len(b) or not len(a):
            raise ValueError(f"a paired bootstrap needs the same {d} queries: {len(a)} against {len(b)}")
        hits = {k: (b < k).astype(float) - (a < k).astype(float) for k in ks}  # per query: b's hit minus a's
        deltas = {k: np.empty(resamples) for k in ks}
        step = max(1, 2_000_000 // len(a))  # resamples drawn at a time: a few million indices in memory
        for start in range(0, resamples, step):
            idx = rng.integers(0, len(a), size=(min(step, resamples - start), len(a)))
            for k in ks:
                deltas[k][start:start + len(idx)] = hits[k][idx].mean(axis=1)
        for k in ks:
            low, high = np.percentile(deltas[k], [tail, 100 - tail])
            out[f"{d}_r@{k}"] = [float(low), float(high)]
    return {key: out[key] for key in recall_from_ranks(ranks_a, ks)}  # k by k, image->text first
