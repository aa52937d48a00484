"""The FAISS image index: exact nearest neighbours of a brute-force search, the approximate kinds, a killed build
that a search can already use and a rerun continues, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from vlmtune.contrastive.pairs import make_shape_captions
from vlmtune.embedding import embed_images, embed_texts, load_embedding_model
from vlmtune.errors import VlmtuneError
from vlmtune.index import build_index, load_index, store

MODEL = "builtin:tiny-clip"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shape_captions(tmp_path_factory.mktemp("shapes"), n_train=30, n_eval=6)


@pytest.fixture(scope="module")
def brute(shapes):
    model, processor, _ = load_embedding_model(MODEL)
    paths = sorted(str(p.absolute()) for p in (shapes / "images").glob("*.png"))
    return model, processor, paths, embed_images(model, processor, paths)


def _quiet(*a):
    pass


def test_flat_index_returns_the_brute_force_neighbours(shapes, brute, tmp_path):
    model, processor, paths, vectors = brute
    index = load_index(build_index(MODEL, shapes / "images", tmp_path / "ix", chunk=7, batch_size=4,
                                   progress=False, log=_quiet))
    assert index.complete and index.paths == paths
    queries = ["a red circle", "the square is blue", "a picture of a yellow triangle"]
    q = embed_texts(model, processor, queries)
    want = np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, :5]
    for query, rows, qv in zip(queries, want, q, strict=True):
        got = index.search(query, k=5)
        assert [p for p, _ in got] == [paths[r] for r in rows]
        np.testing.assert_allclose([s for _, s in got], vectors[rows] @ qv, atol=1e-5)
    scores, rows = index.search_vectors(vectors, k=1)
    assert rows[:, 0].tolist() == list(range(len(paths)))  # every image is its own nearest neighbour


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_each_image_itself(kind, shapes, brute, tmp_path):
    _, _, paths, vectors = brute
    index = load_index(build_index(MODEL, shapes / "images", tmp_path / kind, kind=kind, progress=False, log=_quiet))
    assert index.manifest["kind"] == kind and type(index.index).__name__ != "IndexFlatIP"
    _, rows = index.search_vectors(vectors, k=1)
    assert (rows[:, 0] == np.arange(len(paths))).mean() >= 0.9


def test_a_killed_build_is_searchable_and_a_rerun_embeds_only_the_rest(shapes, brute, tmp_path, monkeypatch):
    _, _, paths, vectors = brute
    out = tmp_path / "ix"
    real_save, saved = store.save_part, []

    def dies_after_two(folder, number, vecs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        real_save(folder, number, vecs)
        saved.append(number)

    monkeypatch.setattr(store, "save_part", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(MODEL, shapes / "images", out, chunk=8, progress=False, log=_quiet)
    monkeypatch.setattr(store, "save_part", real_save)
    assert not list(out.rglob(".*tmp*")) and not (out / store.INDEX).exists()
    partial = load_index(out)
    assert not partial.complete and partial.paths == paths[:16]
    _, rows = partial.search_vectors(vectors[:3], k=1)
    assert rows[:, 0].tolist() == [0, 1, 2]

    embedded = []
    import vlmtune.embedding as embedding  # build_index imports embed_images from here when it runs

    def counting(model, processor, items, batch_size=32, progress=False):
        embedded.extend(items)
        return embed_images(model, processor, items, batch_size)

    monkeypatch.setattr(embedding, "embed_images", counting)
    done = load_index(build_index(MODEL, shapes / "images", out, chunk=8, progress=False, log=_quiet))
    assert embedded == paths[16:]
    assert done.complete and done.paths == paths
    _, rows = done.search_vectors(vectors, k=1)
    assert rows[:, 0].tolist() == list(range(len(paths)))


def test_an_index_of_other_images_is_kept_unless_overwrite(shapes, tmp_path):
    out = build_index(MODEL, shapes / "images", tmp_path / "ix", progress=False, log=_quiet)
    with pytest.raises(VlmtuneError, match="other images, another model or kind.*--overwrite"):
        build_index(MODEL, shapes / "eval.jsonl", out, progress=False, log=_quiet)
    build_index(MODEL, shapes / "eval.jsonl", out, overwrite=True, progress=False, log=_quiet)
    assert len(load_index(out).paths) == 6
    with pytest.raises(VlmtuneError, match="not an image index"):
        load_index(tmp_path)
