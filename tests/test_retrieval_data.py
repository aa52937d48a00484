"""predict --retrieve --data: every row gets the index's top-k images for its own question, at the start of its
last user turn (the rest of the row as it is), and its record carries them; --out writes them, the CLI prints them;
rows that cannot take retrieved images are refused before the VLM loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

import vlmtune
from vlmtune.cli import main
from vlmtune.errors import VlmtuneError
from vlmtune.index import load_index
from vlmtune.inference import encode, single_prompt

from . import test_retrieval as single
from .conftest import write_jsonl

VLM, brute_force_top = single.VLM, single.brute_force_top
# the single-prompt tests' fixtures: the tiny CLIP index of 12 shapes, the tiny VLM, the spies on predict
index_dir, loaded, given_to_generate, vlm_never_loads = (single.index_dir, single.loaded, single.given_to_generate,
                                                         single.vlm_never_loads)

QUESTIONS = ["Which shape is red?", "Find the blue square.", "a green circle"]


@pytest.fixture
def questions(tmp_path):
    """Three text-only messages rows (the second with a system prompt), each ending in its reference answer."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"answer {n}"}]}
            for n, q in enumerate(QUESTIONS)]
    rows[1]["messages"].insert(0, {"role": "system", "content": "You answer about shapes."})
    return write_jsonl(tmp_path / "questions.jsonl", rows)


def test_each_row_gets_the_top_k_images_of_its_own_question(index_dir, loaded, questions, given_to_generate):
    k = 3
    records = vlmtune.predict(VLM, data=questions, retrieve=index_dir, k=k, loaded=loaded, max_new_tokens=2)
    assert [r["reference"] for r in records] == ["answer 0", "answer 1", "answer 2"]
    by_source = {e.source: e for e in given_to_generate}
    wanted = [brute_force_top(index_dir, q, k) for q in QUESTIONS]
    assert len({tuple(w[0]) for w in wanted}) > 1  # the questions retrieve different images
    for record, (want, scores) in zip(records, wanted, strict=True):
        assert [r["path"] for r in record["retrieved"]] == want
        np.testing.assert_allclose([r["score"] for r in record["retrieved"]], scores, atol=1e-5)
        assert by_source[record["source"]].images == want  # what the VLM sees, best first
    first = by_source[records[0]["source"]]
    assert first.input_ids == encode(loaded, single_prompt(wanted[0][0], QUESTIONS[0])).input_ids
    tok = loaded.formatter.tokenizer
    second = tok.decode(by_source[records[1]["source"]].input_ids)
    assert "You answer about shapes." in second and QUESTIONS[1] in second  # the row's own turns are kept


def test_out_writes_every_row_with_its_images_and_the_cli_prints_them(index_dir, questions, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["predict", VLM, "--data", str(questions), "--retrieve", str(index_dir), "-k", "2",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [[r["path"] for r in rec["retrieved"]] for rec in records] == \
        [brute_force_top(index_dir, q, 2)[0] for q in QUESTIONS]
    capsys.readouterr()
    assert main(["predict", VLM, "--data", str(questions), "--retrieve", str(index_dir), "-k", "1",
                 "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [line for line in lines if line.startswith("  retrieved: ")]
    assert len(shown) == 3
    for line, q in zip(shown, QUESTIONS, strict=True):
        (path,), (score,) = brute_force_top(index_dir, q, 1)
        assert line == f"  retrieved: {path} ({score:.4f})"


def test_rows_with_their_own_images_are_refused_before_the_vlm_loads(index_dir, tmp_path, vlm_never_loads):
    image = load_index(index_dir).paths[0]
    rows = [{"messages": [{"role": "user", "content": "Which shape is red?"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "And this?"}]},
                          {"role": "assistant", "content": "b"}]}]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(VlmtuneError, match=r"1 row\(s\) do not fit:\n  - .*mixed.jsonl:2: 1 image\(s\) of its own\n"
                                           r"remove their images"):
        vlmtune.predict(VLM, data=data, retrieve=index_dir, k=2)
    with pytest.raises(VlmtuneError, match="-k 13 asks for more images than the index"):
        vlmtune.predict(VLM, data=write_jsonl(tmp_path / "one.jsonl", rows[:1]), retrieve=index_dir, k=13)


def test_a_row_over_max_length_is_named(index_dir, loaded, questions):
    paths = load_index(index_dir).paths
    one = len(encode(loaded, single_prompt(paths[:1], QUESTIONS[0])).input_ids)
    with pytest.raises(VlmtuneError, match=r"questions.jsonl:1: the prompt with 2 retrieved images .* over the VLM's "
                                           rf"data.max_length={one + 2}; give -k 1 or fewer"):
        vlmtune.predict(VLM, data=questions, retrieve=index_dir, k=2, loaded=loaded, max_length=one + 2)
