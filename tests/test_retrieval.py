"""predict --retrieve: the index's top-k images for the question are the prompt's images, in rank order and
formatted as a row with those images; the CLI prints them with their scores; refusals name the fix (a data file's
rows: tests/test_retrieval_data.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import vlmtune
import vlmtune.inference.run as prediction
from vlmtune.cli import main
from vlmtune.contrastive.pairs import make_shape_captions
from vlmtune.errors import VlmtuneError
from vlmtune.index import build_index, load_index
from vlmtune.inference import encode, load_for_inference, single_prompt

CLIP, VLM = "builtin:tiny-clip", "builtin:tiny-qwen2-vl"
QUESTION = "Which shape is red?"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    data = make_shape_captions(tmp_path_factory.mktemp("pairs"), n_train=10, n_eval=2)
    return build_index(CLIP, data / "images", tmp_path_factory.mktemp("ix") / "ix", progress=False,
                       log=lambda *a: None)


@pytest.fixture(scope="module")
def loaded():
    return load_for_inference(VLM)


def brute_force_top(index_dir, question, k):
    from vlmtune.embedding import embed_images, embed_texts, load_embedding_model

    model, processor, _ = load_embedding_model(CLIP)
    paths = load_index(index_dir).paths
    scores = embed_texts(model, processor, [question])[0] @ embed_images(model, processor, paths).T
    order = np.argsort(-scores, kind="stable")[:k]
    return [paths[i] for i in order], scores[order]


@pytest.fixture
def given_to_generate(monkeypatch):
    """The encoded prompts predict() hands to generate()."""
    seen, real = [], prediction.generate

    def spy(loaded, examples, *args, **kwargs):
        seen.extend(examples)
        return real(loaded, examples, *args, **kwargs)

    monkeypatch.setattr(prediction, "generate", spy)
    return seen


def test_the_top_k_images_are_the_prompts_images_in_order(index_dir, loaded, given_to_generate):
    k = 3
    want, scores = brute_force_top(index_dir, QUESTION, k)
    [record] = vlmtune.predict(VLM, prompt=QUESTION, retrieve=index_dir, k=k, loaded=loaded, max_new_tokens=4)
    assert [r["path"] for r in record["retrieved"]] == want
    np.testing.assert_allclose([r["score"] for r in record["retrieved"]], scores, atol=1e-5)
    [example] = given_to_generate
    assert example.images == want  # the images the VLM sees, best first ...
    assert [kind for _, _, kind in example.media] == ["image"] * k  # ... one token span each ...
    assert example.input_ids == encode(loaded, single_prompt(want, QUESTION)).input_ids  # ... as a row with them
    content = record["row"]["messages"][0]["content"]
    assert [c.get("image") for c in content] == [*want, None] and content[-1]["text"] == QUESTION


def test_cli_prints_the_answer_and_the_images_with_scores(index_dir, capsys):
    want, scores = brute_force_top(index_dir, QUESTION, 2)
    assert main(["predict", VLM, "--retrieve", str(index_dir), "-k", "2", "--prompt", QUESTION,
                 "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("retrieved images (2, best first):")
    assert lines[at + 1:] == [f"  {i}. {s:.4f}  {p}" for i, (p, s) in enumerate(zip(want, scores, strict=True), 1)]


def test_retrieved_images_go_to_out(index_dir, tmp_path):
    vlmtune.predict(VLM, prompt=QUESTION, retrieve=index_dir, k=2, out=tmp_path / "p.jsonl", max_new_tokens=2)
    [record] = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in record["retrieved"]] == brute_force_top(index_dir, QUESTION, 2)[0]


@pytest.fixture
def vlm_never_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the VLM was loaded although the retrieval cannot work")

    monkeypatch.setattr(prediction, "load_for_inference", refuse)


def test_k_larger_than_the_index_is_refused_before_the_vlm_loads(index_dir, vlm_never_loads, capsys):
    assert main(["predict", VLM, "--retrieve", str(index_dir), "-k", "13", "--prompt", QUESTION]) == 2
    err = capsys.readouterr().err
    assert "-k 13 asks for more images than the index" in err and "holds (12); give -k 12 or fewer" in err


def test_an_index_whose_model_cannot_load_is_refused(index_dir, tmp_path, vlm_never_loads):
    import shutil

    moved = tmp_path / "ix"
    shutil.copytree(index_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "model": str(tmp_path / "gone-clip")}))
    with pytest.raises(VlmtuneError, match=r"built with the model '.*gone-clip' \(its manifest.json\), which cannot "
                                           r"be loaded: .*rebuild the index"):
        vlmtune.predict(VLM, prompt=QUESTION, retrieve=moved, k=2)


def test_more_images_than_max_length_holds_suggests_the_k_that_fits(index_dir, loaded):
    paths = load_index(index_dir).paths
    one, two = (len(encode(loaded, single_prompt(paths[:n], QUESTION)).input_ids) for n in (1, 2))
    assert two > one
    with pytest.raises(VlmtuneError, match=rf"with 3 retrieved images .* over the VLM's data.max_length={two}; "
                                           r"give -k 2 or fewer"):
        vlmtune.predict(VLM, prompt=QUESTION, retrieve=index_dir, k=3, loaded=loaded, max_length=two)
    with pytest.raises(VlmtuneError, match="even one image does not fit"):
        vlmtune.predict(VLM, prompt=QUESTION, retrieve=index_dir, k=3, loaded=loaded, max_length=one - 1)
    [record] = vlmtune.predict(VLM, prompt=QUESTION, retrieve=index_dir, k=2, loaded=loaded, max_length=two,
                               max_new_tokens=2)
    assert len(record["retrieved"]) == 2


def test_retrieve_takes_no_image_and_k_needs_it(index_dir, vlm_never_loads):
    with pytest.raises(VlmtuneError, match="--retrieve finds the prompt's images itself: drop --image"):
        vlmtune.predict(VLM, images=[load_index(index_dir).paths[0]], prompt=QUESTION, retrieve=index_dir)
    with pytest.raises(VlmtuneError, match="give --retrieve INDEX with it"):
        vlmtune.predict(VLM, prompt=QUESTION, k=2)


def test_a_stopped_build_answers_from_the_images_embedded_so_far(index_dir, tmp_path, loaded, capsys):
    import shutil

    partial = tmp_path / "ix"
    shutil.copytree(index_dir, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**manifest, "complete": False, "chunk": 5}))
    (partial / "index.faiss").unlink()
    shutil.rmtree(partial / "parts")
    (partial / "parts").mkdir()
    np.save(partial / "parts" / "part-000000.npy", load_index(index_dir).index.reconstruct_n(0, 5))
    [record] = vlmtune.predict(VLM, prompt=QUESTION, retrieve=partial, k=2, loaded=loaded, max_new_tokens=2)
    assert {r["path"] for r in record["retrieved"]} <= set(load_index(index_dir).paths[:5])
    assert "is not complete (5 of 12 images embedded)" in capsys.readouterr().err


def test_a_retrieved_image_that_is_gone_names_the_index(index_dir, tmp_path, loaded):
    import shutil

    moved = tmp_path / "ix"
    shutil.copytree(index_dir, moved)
    paths = (moved / "paths.txt").read_text().splitlines()
    (moved / "paths.txt").write_text("\n".join([str(tmp_path / "gone.png"), *paths[1:]]) + "\n")
    with pytest.raises(VlmtuneError, match=rf"an image retrieved from the index at {moved} cannot be read: .*gone.png.*rebuild"):
        vlmtune.predict(VLM, prompt=QUESTION, retrieve=moved, k=12, loaded=loaded)
