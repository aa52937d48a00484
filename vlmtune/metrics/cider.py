"""CIDEr-D of any resample of the rows, fast enough to bootstrap: pycocoevalcap's formula as sparse sums.

pycocoevalcap's CiderScorer rebuilds every reference's tf-idf vector on each call (minutes for a 1000-resample
bootstrap of 200 rows). Its score only depends on the resample through the document frequencies, and every
term is linear in the squared idf weights v[g] = (log N - log max(1, df[g]))^2 (weights are never negative:
df <= N), because min(tf_h w, tf_r w) * tf_r w = w^2 min(tf_h, tf_r) tf_r:
  sim_n(h, r) = sum_g v min(tf_h, tf_r) tf_r / sqrt(sum_g v tf_h^2 * sum_g v tf_r^2)   (0 if a norm is 0)
  row = 10 * mean over references of (exp(-(len_h - len_r)^2 / 2 sigma^2) * mean over n of sim_n)
with the library's quirk kept: a caption's length is its number of bigrams. The counts are the library's own
(`cook_refs` / `cook_test`); tests check the result against CiderScorer on resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_GRAMS = 4
SIGMA = 6.0


@dataclass(frozen=True)
class CiderTables:
    n_rows: int
    n_terms: int
    doc: tuple[np.ndarray, np.ndarray]  # (row, term): the n-grams of each row's references, once per row
    hyp: tuple[np.ndarray, np.ndarray, np.ndarray]  # (row * N + n, term, tf_h^2)
    ref: tuple[np.ndarray, np.ndarray, np.ndarray]  # (pair * N + n, term, tf_r^2); pair = one (row, reference)
    cross: tuple[np.ndarray, np.ndarray, np.ndarray]  # (pair * N + n, term, min(tf_h, tf_r) * tf_r)
    pair_row: np.ndarray  # the row of each pair
    penalty: np.ndarray  # per pair: the Gaussian length penalty
    refs_per_row: np.ndarray


def _length(counts: dict) -> int:
    return sum(tf for gram, tf in counts.items() if len(gram) == 2)


def build_tables(cooked: list[tuple[list[dict], dict]]) -> CiderTables:
    """From each row's (cook_refs(refs), cook_test(hyp))."""
    terms: dict[tuple, int] = {}
    doc, hyp, ref, cross = ([], []), ([], [], []), ([], [], []), ([], [], [])
    pair_row, penalty, refs_per_row = [], [], []

    def add(table, key, gram, value):
        table[0].append(key)
        table[1].append(terms.setdefault(gram, len(terms)))
        table[2].append(value)

    for i, (crefs, test) in enumerate(cooked):
        seen = set()
        for counts in crefs:
            for gram in counts:
                if gram not in seen:
                    seen.add(gram)
                    doc[0].append(i)
                    doc[1].append(terms.setdefault(gram, len(terms)))
        for gram, tf in test.items():
            add(hyp, i * N_GRAMS + len(gram) - 1, gram, float(tf * tf))
        for counts in crefs:
            pair = len(pair_row)
            pair_row.append(i)
            penalty.append(np.exp(-((_length(test) - _length(counts)) ** 2) / (2 * SIGMA ** 2)))
            for gram, tf in counts.items():
                add(ref, pair * N_GRAMS + len(gram) - 1, gram, float(tf * tf))
                if gram in test:
                    add(cross, pair * N_GRAMS + len(gram) - 1, gram, float(min(test[gram], tf) * tf))
        refs_per_row.append(len(crefs))

    def arrays(table):
        return tuple(np.asarray(col, dtype=float if k == 2 else np.int64) for k, col in enumerate(table))

    return CiderTables(len(cooked), len(terms), arrays(doc), arrays(hyp), arrays(ref), arrays(cross),
                       np.asarray(pair_row, dtype=np.int64), np.asarray(penalty), np.asarray(refs_per_row))


def _weighted(table, v: np.ndarray, size: int) -> np.ndarray:
    keys, cols, values = table
    return np.bincount(keys, weights=values * v[cols], minlength=size).astype(float)  # int when empty


def cider_rows(t: CiderTables, counts: np.ndarray) -> np.ndarray:
    """Each row's CIDEr-D in a corpus holding row i counts[i] times (the library's per-row scores)."""
    total = counts.sum()
    df = np.bincount(t.doc[1], weights=counts[t.doc[0]], minlength=t.n_terms)
    v = (np.log(float(total)) - np.log(np.maximum(1.0, df))) ** 2
    pairs = len(t.pair_row)
    hyp_norm = np.sqrt(_weighted(t.hyp, v, t.n_rows * N_GRAMS)).reshape(t.n_rows, N_GRAMS)
    ref_norm = np.sqrt(_weighted(t.ref, v, pairs * N_GRAMS)).reshape(pairs, N_GRAMS)
    num = _weighted(t.cross, v, pairs * N_GRAMS).reshape(pairs, N_GRAMS)
    norms = hyp_norm[t.pair_row] * ref_norm
    sim = np.divide(num, norms, out=np.zeros_like(num), where=norms != 0)
    per_pair = sim.mean(axis=1) * t.penalty
    return 10.0 * np.bincount(t.pair_row, weights=per_pair, minlength=t.n_rows) / np.maximum(t.refs_per_row, 1)


def corpus_cider(t: CiderTables, idx: np.ndarray) -> float:
    """The library's corpus CIDEr-D (mean of the rows) of the rows at idx, repeats counted."""
    if not len(idx):
        return 0.0
    counts = np.bincount(idx, minlength=t.n_rows).astype(float)
    return float((cider_rows(t, counts) * counts).sum() / counts.sum())
