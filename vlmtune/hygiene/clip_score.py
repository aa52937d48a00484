"""How well each row's text matches its image under a CLIP-style dual encoder: the cosine of their embeddings.

A row with several images scores its best image (its text need only describe one of them); a row listing several
captions (answers) scores its worst one (one wrong caption flags the row); rows without an image or whose images
cannot be read are not scored. The cut-off is a fixed `threshold`, the lowest `quantile`
of the scores, or by default Tukey's lower fence (Q1 - 1.5 x IQR): scores far below the bulk, whatever scale the
model's cosines have (CLIP ViT-B/32's matching pairs sit near 0.3, a tiny test model's elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import VlmtuneError
from .rows import SampleRow

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@dataclass
class ClipScores:
    model: str
    rows: list[SampleRow]
    scores: np.ndarray  # one cosine per row of `rows`
    threshold: float
    rule: str  # how the threshold was chosen, in words
    unscored: list[tuple[SampleRow, str]] = field(default_factory=list)  # (row, why)

    def below(self) -> list[tuple[SampleRow, float]]:
        """(row, score) of every row under the threshold, lowest first."""
        low = [(r, float(s)) for r, s in zip(self.rows, self.scores, strict=True) if s < self.threshold]
        return sorted(low, key=lambda rs: rs[1])

    def quantiles(self) -> dict[float, float]:
        return {q: float(np.quantile(self.scores, q)) for q in QUANTILES} if len(self.scores) else {}

    def histogram(self, bins: int = 10, width: int = 40) -> list[str]:
        """A text histogram: one line per bin, its range, count and a bar; the threshold's bin is marked."""
        if not len(self.scores):
            return []
        counts, edges = np.histogram(self.scores, bins=bins)
        top = max(counts.max(), 1)
        lines = []
        for i, c in enumerate(counts):
            mark = " <- threshold" if edges[i] <= self.threshold < edges[i + 1] else ""
            bar = "#" * int(round(width * c / top)) if c else ""
            lines.append(f"  [{edges[i]:+.3f}, {edges[i + 1]:+.3f}) {c:6d} {bar}{mark}".rstrip())
        return lines


def choose_threshold(scores: np.ndarray, threshold: float | None, quantile: float | None) -> tuple[float, str]:
    if threshold is not None and quantile is not None:
        raise VlmtuneError("give either --clip-threshold or --clip-quantile (clip_threshold or clip_quantile), "
                           "not both")
    if threshold is not None:
        return float(threshold), f"threshold {threshold:g}"
    if not len(scores):
        return float("-inf"), "no scores"
    if quantile is not None:
        if not 0 < quantile < 1:
            raise VlmtuneError(f"--clip-quantile must be in (0, 1), got {quantile:g} (0.05 flags the lowest 5%)")
        return float(np.quantile(scores, quantile)), f"the lowest {quantile:.0%} (quantile {quantile:g})"
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    return float(q1 - 1.5 * (q3 - q1)), "Tukey's lower fence Q1 - 1.5 IQR (set --clip-threshold or --clip-quantile)"


def score_rows(rows: list[SampleRow], model_name: str, threshold: float | None = None,
               quantile: float | None = None, batch_size: int = 64, progress: bool = True) -> ClipScores:
    """Embed every distinct image and text once under `model_name` (a CLIP/SigLIP folder, hub id, builtin:tiny-clip
    or contrastive adapter folder) and score each row with images."""
    from ..data.images import ImageProblem, image_size
    from ..embedding import embed_images, embed_texts, load_embedding_model

    model, processor, _ = load_embedding_model(model_name)
    unscored, readable = [], {}
    for path in dict.fromkeys(p for r in rows for p in r.images):  # headers only: embedding decodes them
        try:
            readable[path] = bool(image_size(path))
        except (ImageProblem, OSError):
            readable[path] = False
    scored = []
    for r in rows:
        if not r.images:
            unscored.append((r, "no image"))
        elif not r.text:
            unscored.append((r, "no text"))
        elif not all(readable[p] for p in r.images):
            unscored.append((r, "an image cannot be read (validate lists it)"))
        else:
            scored.append(r)
    images = list(dict.fromkeys(p for r in scored for p in r.images))
    texts = list(dict.fromkeys(t for r in scored for t in r.texts))
    image_vec = embed_images(model, processor, images, batch_size=batch_size, progress=progress and len(images) > 256)
    text_vec = embed_texts(model, processor, texts, batch_size=batch_size, progress=progress and len(texts) > 256)
    image_at = {p: i for i, p in enumerate(images)}
    text_at = {t: i for i, t in enumerate(texts)}
    scores = np.array([min(max(float(image_vec[image_at[p]] @ text_vec[text_at[t]]) for p in r.images)
                           for t in r.texts) for r in scored], dtype=np.float32)
    cut, rule = choose_threshold(scores, threshold, quantile)
    return ClipScores(model_name, scored, scores, cut, rule, unscored)
