"""`vlmtune eval` / vlmtune.evaluate on dual encoders: bare CLIP / SigLIP folders and builtin ids, contrastive
adapters and merged folders; image<->text recall@K equal to a direct count, --against base|none|OTHER side by side,
bootstrap intervals of the differences over resampled queries, --metric recall@K, and the options that do not apply
refused by name before any weights load."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import vlmtune
from vlmtune.cli import main
from vlmtune.contrastive.pairs import make_shape_captions, read_pairs
from vlmtune.errors import VlmtuneError

CLIP = "builtin:tiny-clip"
KEYS = [f"{d}_r@{k}" for k in (1, 5, 10) for d in ("i2t", "t2i")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shape_captions(tmp_path_factory.mktemp("pairs"), n_train=4, n_eval=12) / "eval.jsonl"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A plain CLIPModel folder (another seed than the builtin), no vlmtune.json."""
    from vlmtune.embedding import build_tiny_dir

    return build_tiny_dir(tmp_path_factory.mktemp("bare") / "clip", "clip", seed=1)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A contrastive LoRA adapter on the tiny CLIP with random (non-zero) LoRA weights, as a run saves one."""
    import torch

    from vlmtune.contrastive.model import attach_lora
    from vlmtune.embedding import load_embedding_model

    folder = tmp_path_factory.mktemp("adapter") / "run"
    model, processor, family = load_embedding_model(CLIP)
    lora = SimpleNamespace(r=4, alpha=16, dropout=0.0, use_rslora=False, target_modules=None, modules_to_save=[])
    peft_model = attach_lora(model, family, lora, "both")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "vlmtune.json").write_text(json.dumps({"method": "contrastive", "family": "clip", "base_model": CLIP}))
    return folder


def direct_recall(model_ref, data_file, ks=(1, 5, 10)) -> dict[str, float]:
    """recall@k counted query by query: a hit when a right answer is among the k best candidates (ties against)."""
    from vlmtune.embedding import embed_images, embed_texts, load_embedding_model

    model, processor, _ = load_embedding_model(model_ref)
    pairs = read_pairs(data_file, {})
    texts = [(i, c) for i, p in enumerate(pairs) for c in p.captions]
    img = embed_images(model, processor, [p.image for p in pairs])
    txt = embed_texts(model, processor, [c for _, c in texts])
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(pairs)):
            best_own = max(float(img[i] @ txt[j]) for j, (owner, _) in enumerate(texts) if owner == i)
            wrong = sum(float(img[i] @ txt[j]) >= best_own for j, (owner, _) in enumerate(texts) if owner != i)
            hits += wrong < k
        out[f"i2t_r@{k}"] = hits / len(pairs)
        hits = 0
        for j, (owner, _) in enumerate(texts):
            wrong = sum(float(img[i] @ txt[j]) >= float(img[owner] @ txt[j]) for i in range(len(pairs)) if i != owner)
            hits += wrong < k
        out[f"t2i_r@{k}"] = hits / len(texts)
    return {key: out[key] for key in (f"{d}_r@{k}" for k in ks for d in ("i2t", "t2i"))}


def test_a_bare_clip_folder_and_the_builtin_ids_report_their_recall(bare, data):
    result = vlmtune.evaluate(bare, data, progress=False)
    s = result.summary
    assert s["compared"] == ["model"] and s["pairs"] == 12 and s["captions"] == 36
    assert s["recall"]["model"] == pytest.approx(direct_recall(bare, data))
    assert "intervals" not in s
    siglip = vlmtune.evaluate("builtin:tiny-siglip", data, progress=False).summary
    assert siglip["recall"]["model"] == pytest.approx(direct_recall("builtin:tiny-siglip", data))
    assert list(siglip["recall"]["model"]) == KEYS


def test_an_adapter_is_compared_with_its_base_by_default(adapter, data):
    s = vlmtune.evaluate(adapter, data, progress=False, bootstrap=200).summary
    assert s["compared"] == ["base", "adapter"]
    assert s["recall"]["base"] == pytest.approx(direct_recall(CLIP, data))
    assert s["recall"]["adapter"] == pytest.approx(direct_recall(adapter, data))
    assert s["recall"]["adapter"] != s["recall"]["base"]  # the adapter changes the embeddings
    assert s["bootstrap_resamples"] == 200 and s["confidence"] == 0.95
    for key in KEYS:
        delta = s["recall"]["adapter"][key] - s["recall"]["base"][key]
        assert s["intervals"][key]["delta"] == pytest.approx(delta)
        low, high = s["intervals"][key]["ci95"]
        assert -1 <= low <= high <= 1


def _hits(model_ref, data_file):
    """Per-query ranks of each direction, counted directly (as direct_recall counts them)."""
    from vlmtune.embedding import embed_images, embed_texts, load_embedding_model

    model, processor, _ = load_embedding_model(model_ref)
    pairs = read_pairs(data_file, {})
    owner = np.array([i for i, p in enumerate(pairs) for _ in p.captions])
    scores = embed_images(model, processor, [p.image for p in pairs]) @ embed_texts(
        model, processor, [c for p in pairs for c in p.captions]).T
    i2t = [sum(scores[i, j] >= scores[i, owner == i].max() for j in np.flatnonzero(owner != i))
           for i in range(len(pairs))]
    t2i = [sum(scores[i, j] >= scores[owner[j], j] for i in range(len(pairs)) if i != owner[j])
           for j in range(len(owner))]
    return {"i2t": np.array(i2t), "t2i": np.array(t2i)}


def test_the_intervals_resample_each_directions_queries(adapter, data, bare):
    resamples, seed = 300, 5
    s = vlmtune.evaluate(adapter, data, against=str(bare), progress=False, bootstrap=resamples, seed=seed).summary
    assert s["compared"] == ["against", "adapter"] and s["seed"] == seed
    a, b = _hits(bare, data), _hits(adapter, data)
    rng = np.random.default_rng(seed)
    for d in ("i2t", "t2i"):
        idx = rng.integers(0, len(a[d]), size=(resamples, len(a[d])))  # one draw of every resample's queries
        for k in (1, 5, 10):
            diff = (b[d] < k).astype(float) - (a[d] < k).astype(float)
            want = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
            assert s["intervals"][f"{d}_r@{k}"]["ci95"] == pytest.approx(list(want))
    again = vlmtune.evaluate(adapter, data, against=str(bare), progress=False, bootstrap=resamples, seed=seed)
    assert again.summary["intervals"] == s["intervals"]


def test_against_another_model_and_against_none(bare, adapter, data):
    other = vlmtune.evaluate(bare, data, against=CLIP, progress=False, bootstrap=50).summary
    assert other["compared"] == ["against", "model"]
    assert other["systems"] == {"against": {"model": CLIP}, "model": {"model": str(bare)}}
    assert other["recall"]["against"] == pytest.approx(direct_recall(CLIP, data))
    assert other["recall"]["model"] == pytest.approx(direct_recall(bare, data))
    alone = vlmtune.evaluate(adapter, data, against="none", progress=False).summary
    assert alone["compared"] == ["adapter"] and alone["recall"]["adapter"] == pytest.approx(direct_recall(adapter, data))
    same = vlmtune.evaluate(bare, data, against=str(bare), progress=False, bootstrap=50).summary
    assert all(v == {"delta": 0.0, "ci95": [0.0, 0.0]} for v in same["intervals"].values())


def test_a_merged_folder_is_compared_with_its_recorded_base(adapter, data, tmp_path):
    from vlmtune.contrastive.merge import merge_contrastive

    merged = merge_contrastive(adapter, tmp_path / "merged", log=lambda *a: None)
    s = vlmtune.evaluate(merged, data, progress=False, bootstrap=50).summary
    assert s["compared"] == ["base", "model"]
    assert s["recall"]["model"] == pytest.approx(direct_recall(adapter, data))
    assert s["recall"]["base"] == pytest.approx(direct_recall(CLIP, data))


def test_metric_picks_the_recall_cutoffs_and_refuses_other_names(bare, data):
    s = vlmtune.evaluate(bare, data, metrics=["recall@1", "recall@3"], progress=False).summary
    assert s["metrics_used"] == ["recall@1", "recall@3"]
    assert s["recall"]["model"] == pytest.approx(direct_recall(bare, data, ks=(1, 3)))
    with pytest.raises(VlmtuneError, match=r"--metric bleu4: .*recall@K for any K >= 1, e.g. recall@1, recall@5, "
                                           r"recall@10"):
        vlmtune.evaluate(bare, data, metrics=["recall@1", "bleu4"])


@pytest.fixture
def nothing_loads(monkeypatch):
    import vlmtune.embedding as embedding

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded although the options are refused")

    monkeypatch.setattr(embedding, "load_embedding_model", refuse)


@pytest.mark.parametrize(("args", "message"), [
    (["--max-new-tokens", "5"], "--max-new-tokens does not apply to .*a dual encoder generates no text"),
    (["--format", "vqa"], "--format vqa: a dual encoder is evaluated on caption rows"),
    (["--base", CLIP], "--base names the base model an adapter loads on, but .* is a full model"),
    (["--against", "base"], "--against base compares .* records none .*--against none"),
    (["--against", "builtin:tiny-qwen2-vl"], "--against builtin:tiny-qwen2-vl is not a dual encoder"),
    (["--metric", "cider"], "--metric cider: a dual encoder is scored by retrieval recall"),
    (["--bootstrap", "0"], "bootstrap must be positive"),
])
def test_options_that_do_not_apply_are_refused_by_name(bare, data, nothing_loads, capsys, args, message):
    import re

    assert main(["eval", str(bare), "--data", str(data), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_prints_base_adapter_delta_and_out_keeps_the_records(adapter, data, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", str(adapter), "--data", str(data), "--bootstrap", "100", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("image<->text retrieval on") and "(12 images, 36 captions)" in lines[0]
    assert lines[1].split() == ["metric", "base", "adapter", "delta", "95%", "CI"]
    summary = json.loads((out / "summary.json").read_text())
    for line in lines[2:]:
        key, base, mine, delta, low, high = line.replace("[", "").replace("]", "").replace(",", "").split()
        assert float(base) == pytest.approx(summary["recall"]["base"][key], abs=5e-4)
        assert float(mine) == pytest.approx(summary["recall"]["adapter"][key], abs=5e-4)
        assert [float(low), float(high)] == pytest.approx(summary["intervals"][key]["ci95"], abs=5e-4)
    assert [line.split()[0] for line in lines[2:]] == KEYS
    records = [json.loads(r) for r in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["system"] for r in records] == ["base", "adapter"]
    assert {k: records[0][k] for k in KEYS} == summary["recall"]["base"]
    assert records[1]["ci95"] == {k: v["ci95"] for k, v in summary["intervals"].items()}
    assert main(["eval", str(adapter), "--data", str(data), "--out", str(out)]) == 2  # an earlier eval: --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_a_vlm_still_takes_the_generating_path():
    from vlmtune.embedding import dual_encoder_family
    from vlmtune.evaluation.run import _own_run_method

    assert _own_run_method("builtin:tiny-qwen2-vl") is None and dual_encoder_family("builtin:tiny-qwen2-vl") is None
    assert _own_run_method(CLIP).name == "contrastive" and dual_encoder_family("builtin:tiny-siglip").name == "siglip"
