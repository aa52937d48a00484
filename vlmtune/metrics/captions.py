"""Caption metrics as the COCO caption evaluation computes them, scored by pycocoevalcap's own scorers.

- BLEU-4: pycocoevalcap's BleuScorer, corpus-level (n-gram counts and lengths summed over the rows, the
  "closest" reference length for the brevity penalty); the row score is its per-caption BLEU-4.
- CIDEr: pycocoevalcap's CiderScorer, i.e. CIDEr-D as COCO reports it (tf-idf n-grams 1..4, idf from the
  references of the rows scored, clipping, Gaussian length penalty sigma 6, x10); corpus-level because the
  idf depends on every row; the row score is that caption's CIDEr within the corpus. Resamples are scored by
  `cider.py`, the same formula over the library's n-gram counts, vectorised (the library takes minutes).
- ROUGE-L: pycocoevalcap's Rouge (LCS F-measure, beta 1.2, best precision and recall over the references),
  the mean of the rows.
COCO tokenises with the Stanford PTB tokenizer, which needs Java; `tokenize` stands in for it in Python:
lowercase, clitics split off ("dog's" -> "dog 's", "can't" -> "ca n't"), the punctuation tokens COCO drops
removed (. , ? ! : ; - -- ... quotes brackets), words with inner hyphens or periods ("t-shirt", "3.5") kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_refs, cook_test
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.cider.cider_scorer import cook_refs as cider_refs
from pycocoevalcap.cider.cider_scorer import cook_test as cider_test
from pycocoevalcap.rouge.rouge import Rouge

from .base import Metric, Prepared, Sample, per_row
from .cider import SIGMA, build_tables, corpus_cider

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'m|'d)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|m|d)\b|\w+(?:[-.'/]\w+)*|\S")
_DROPPED = frozenset({"'", "''", "`", "``", '"', ".", "?", "!", ",", ":", ";", "-", "--", "...", "(", ")", "{", "}",
                      "[", "]"})


def tokenize(text: str) -> str:
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    return " ".join(t for t in _TOKEN.findall(text) if t not in _DROPPED)


def _tokenized(samples: Sequence[Sample]) -> list[tuple[str, list[str]]]:
    out = []
    for i, s in enumerate(samples):
        if not s.references:
            raise ValueError(f"row {i + 1}: a caption metric needs at least one reference caption")
        out.append((tokenize(s.prediction), [tokenize(r) for r in s.references]))
    return out


def _bleu_scorer(tests: list[dict]) -> BleuScorer:
    scorer = BleuScorer(n=4)
    scorer.ctest = tests
    scorer.crefs = [None] * len(tests)  # only the counts in ctest are read when the reference length is chosen
    return scorer


def _bleu_prepare(samples: Sequence[Sample]) -> Prepared:
    tests = [cook_test(hyp, cook_refs(refs)) for hyp, refs in _tokenized(samples)]
    rows = _bleu_scorer(tests).compute_score(option="closest", verbose=0)[1][3] if tests else []
    # per row: test length, closest reference length (the library's choice), guessed and correct n-grams 1..4
    stats = np.array([[t["testlen"], min((abs(r - t["testlen"]), r) for r in t["reflen"])[1], *t["guess"],
                       *t["correct"]] for t in tests], dtype=float).reshape(len(tests), 10)
    return Prepared(np.array(rows, dtype=float), stats)


def _bleu_aggregate(prepared: Prepared, idx: np.ndarray) -> dict[str, float]:
    """Corpus BLEU sums the rows' counts, so a resample's is the library's score of one row holding the sums."""
    if not len(idx):
        return {"bleu4": 0.0}
    total = prepared.data[idx].sum(axis=0)
    summed = {"testlen": total[0], "reflen": [total[1]], "guess": list(total[2:6]), "correct": list(total[6:10])}
    return {"bleu4": float(_bleu_scorer([summed]).compute_score(option="closest", verbose=0)[0][3])}


def _cider_prepare(samples: Sequence[Sample]) -> Prepared:
    cooked = [(cider_refs(refs), cider_test(hyp)) for hyp, refs in _tokenized(samples)]
    rows: list[float] = []
    if cooked and any(ref for refs, _ in cooked for ref in refs):  # else no reference n-gram: the library asserts
        scorer = CiderScorer(n=4, sigma=SIGMA)
        scorer.crefs, scorer.ctest = [c for c, _ in cooked], [t for _, t in cooked]
        rows = [float(x) for x in scorer.compute_score()[1]]
    return Prepared(np.array(rows or [0.0] * len(cooked), dtype=float), build_tables(cooked))


def _cider_aggregate(prepared: Prepared, idx: np.ndarray) -> dict[str, float]:
    return {"cider": corpus_cider(prepared.data, idx)}


_ROUGE = Rouge()


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    if not references:
        return 0.0
    return float(_ROUGE.calc_score([tokenize(prediction)], [tokenize(r) for r in references]))


BLEU4 = Metric("bleu4", "BLEU-4, corpus-level, pycocoevalcap's BleuScorer (COCO caption eval)",
               _bleu_prepare, _bleu_aggregate, corpus=True)
CIDER = Metric("cider", "CIDEr-D, corpus-level, pycocoevalcap's CiderScorer (COCO caption eval)",
               _cider_prepare, _cider_aggregate, corpus=True)
ROUGE_L = per_row("rouge_l", "ROUGE-L (LCS F, beta 1.2), pycocoevalcap's Rouge (COCO caption eval), mean of rows",
                  lambda s: rouge_l(s.prediction, s.references))
