"""Retrieval recall@k between images and their captions (several captions per image allowed)."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, ks=KS) -> dict[str, float]:
    """image->text: an image counts when any of its captions is among its k best texts; text->image: a caption
    counts when its image is among its k best images. `text_image[j]` is the image index of caption j; scores
    are inner products (cosines for unit rows). Keys `i2t_r@k`, `t2i_r@k`."""
    scores = image_emb @ text_emb.T  # images x texts
    text_image = np.asarray(text_image)
    # rank = how many wrong candidates score at least as high (a tie counts against: a constant model scores 0)
    out = {}
    mine = text_image[None, :] == np.arange(len(image_emb))[:, None]  # images x texts: caption j is image i's
    own = np.where(mine, scores, -np.inf).max(axis=1)
    i2t_rank = ((scores >= own[:, None]) & ~mine).sum(axis=1)
    pair = scores[text_image, np.arange(len(text_image))]
    t2i_rank = ((scores.T >= pair[:, None]) & ~mine.T).sum(axis=1)
    for k in ks:
        out[f"i2t_r@{k}"] = float((i2t_rank < k).mean())
        out[f"t2i_r@{k}"] = float((t2i_rank < k).mean())
    return out


def pair_recall(model, processor, pairs, batch_size: int = 32) -> dict[str, float]:
    """recall_at_k of a loaded model on Pairs: every caption of every pair."""
    from ..embedding import embed_images, embed_texts

    texts = [c for p in pairs for c in p.captions]
    owner = [i for i, p in enumerate(pairs) for _ in p.captions]
    images = embed_images(model, processor, [p.image for p in pairs], batch_size)
    return recall_at_k(images, embed_texts(model, processor, texts, batch_size), np.array(owner))
