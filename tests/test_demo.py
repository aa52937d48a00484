"""Tests for the offline demo assets: tiny tokenizer, tiny builtin models and the shapes dataset."""

import json
import math
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmtune import demo
from vlmtune.families import qwen2_vl

from . import conftest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data_templates" / "shapes"
REFERENCE = conftest.REFERENCE / "qwen2_5_vl_7b_instruct" / "chat_template.json"


@pytest.fixture(scope="module")
def tok():
    return demo.build_tiny_tokenizer(chat_template=demo.QWEN_VL_CHAT_TEMPLATE)


# ---------------------------------------------------------------- tokenizer
@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference files not present")
def test_chat_template_is_byte_identical_to_reference():
    assert demo.QWEN_VL_CHAT_TEMPLATE == json.loads(REFERENCE.read_text())["chat_template"]


def test_tokenizer_special_tokens(tok):
    ids = tok.convert_tokens_to_ids(list(demo.SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(demo.SPECIAL_TOKENS)))
    assert ids[-1] == len(tok) - 1 and 900 <= len(tok) <= 1100
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None and tok.unk_token is None
    for token, token_id in zip(demo.SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(token) == [token_id]
        assert tok.encode(f"a{token}b")[1:-1] == [token_id]
    assert tok.chat_template == demo.QWEN_VL_CHAT_TEMPLATE


def test_tokenizer_is_deterministic_and_fast(tok):
    again = demo.build_tiny_tokenizer(chat_template=demo.QWEN_VL_CHAT_TEMPLATE)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    code = (
        "from vlmtune import demo; print(demo.build_tiny_tokenizer().encode('The circle is red. Hi, 日本!'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == tok.encode("The circle is red. Hi, 日本!")


def test_tokenizer_compresses_dataset_text(tok):
    assert tok.tokenize("What colour is the circle?") == ["What", "Ġcolour", "Ġis", "Ġthe", "Ġcircle", "?"]
    assert len(tok.encode("You are a helpful assistant.")) == 6
    assert all(len(tok.encode(role)) == 1 for role in ("system", "user", "assistant"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_tokenizer_roundtrip(tok, text):
    # Qwen2 tokenizers NFC-normalise their input; everything else round-trips byte for byte.
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize(
    "text", ["héllo wörld", "日本語のテキスト", "emoji 🚀🧪 ok", "tabs\tand\nnewlines  x", "ß∑≈ç√"]
)
def test_tokenizer_roundtrip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_saved_tokenizer_reloads_identically(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hé 🚀 2 shapes?<|im_end|>\n"
    assert loaded.encode(sample) == tok.encode(sample)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


# ---------------------------------------------------------------- builtin models
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlmtune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMTUNE_CACHE", str(path))
        yield path


def _images(row, base):
    return [
        Image.open(base / c["image"]) for m in row["messages"] for c in m["content"] if c["type"] == "image"
    ]


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


QWEN2_VL_MODULE = {f.name for f in qwen2_vl.FAMILIES}  # the builtins built by families/qwen2_vl.py


@pytest.mark.parametrize("name", sorted(n for n, f in demo.BUILTIN_MODELS.items() if f in QWEN2_VL_MODULE))
def test_builtin_model_loads_and_runs(name, cache_dir):  # every other builtin: tests/test_families.py
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    path = demo.builtin_model_path(name)
    assert path == cache_dir / "builtin" / name
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo.builtin_model_path(name) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    assert model.config.model_type == demo.BUILTIN_MODELS[name]
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert processor.chat_template == demo.QWEN_VL_CHAT_TEMPLATE
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")

    rows = _rows(SHIPPED / "train.jsonl")
    two_images = next(r for r in rows if len(_images(r, SHIPPED)) == 2)
    multi_turn = next(r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) == 2)
    texts = [processor.apply_chat_template(r["messages"], tokenize=False) for r in (two_images, multi_turn)]
    images = _images(two_images, SHIPPED) + _images(multi_turn, SHIPPED)
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert batch["image_grid_thw"].shape == (3, 3)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0

    # apply_chat_template can also load the images itself from (absolute) paths
    row = json.loads(json.dumps(multi_turn))
    for m in row["messages"]:
        for c in m["content"]:
            if c["type"] == "image":
                c["image"] = str(SHIPPED / c["image"])
    inputs = processor.apply_chat_template(
        row["messages"], tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4  # 56 px -> 2x2 merged patches
    big = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (640, 480))]
    )
    assert sum(t == model.config.image_token_id for t in big["input_ids"][0]) <= 64
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_stale_or_partial_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path))
    target = tmp_path / "builtin" / "tiny-qwen2-vl"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "vlmtune-builtin.json").write_text('{"family": "qwen2_vl", "build": "old"}')
    assert demo.builtin_model_path("tiny-qwen2-vl") == target
    assert json.loads((target / "config.json").read_text())["model_type"] == "qwen2_vl"
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-qwen2-vl"]


def test_unknown_names_raise():
    with pytest.raises(KeyError):
        demo.builtin_model_path("tiny-nope")
    with pytest.raises(ValueError):
        demo.build_tiny_model_dir("unused", family="nope")


def test_tiny_model_dir_is_seeded(tmp_path):
    from safetensors.torch import load_file

    a, b, c = (demo.build_tiny_model_dir(tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    key = next(k for k in wa if k.endswith("embed_tokens.weight"))
    assert (wa[key] == wb[key]).all() and not (wa[key] == wc[key]).all()


# ---------------------------------------------------------------- shapes dataset
_COLOUR_NAMES = list(demo.COLOURS)


def _analyse(path):
    """Recover (shape, colour) left to right from a palette image."""
    pixels = np.array(Image.open(path))
    found = []
    for index, colour in enumerate(_COLOUR_NAMES, start=1):
        ys, xs = np.nonzero(pixels == index)
        if len(xs):
            fill = len(xs) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
            found.append((xs.mean(), shape, colour))
    return [(shape, colour) for _, shape, colour in sorted(found)]


def _expected(question, scenes):
    scene = scenes[0]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return f"The {m[1]} is {dict(scene)[m[1]]}."
    if m := re.fullmatch(r"Which shape is (\w+)\?", question):
        return f"The {m[1]} shape is a {next(s for s, c in scene if c == m[1])}."
    if question == "How many shapes are there?":
        return "There is 1 shape." if len(scene) == 1 else f"There are {len(scene)} shapes."
    if m := re.fullmatch(r"Which shape is on the (left|right)\?", question):
        return f"The {scene[0 if m[1] == 'left' else -1][0]} is on the {m[1]}."
    if question == "How many shapes are in the two pictures together?":
        return f"There are {sum(len(s) for s in scenes)} shapes in total."
    raise AssertionError(f"unexpected question {question!r}")


def _check_rows(jsonl):
    base, kinds = jsonl.parent, set()
    for row in _rows(jsonl):
        msgs = row["messages"]
        if msgs[0]["role"] == "system":
            kinds.add("system")
            msgs = msgs[1:]
        images = [c["image"] for c in msgs[0]["content"] if c["type"] == "image"]
        assert 1 <= len(images) <= 2 and all(not Path(p).is_absolute() for p in images)
        assert all((base / p).is_file() for p in images)
        scenes = [_analyse(base / p) for p in images]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        for user, assistant in zip(msgs[::2], msgs[1::2], strict=True):
            question = next(c["text"] for c in user["content"] if c["type"] == "text")
            assert assistant["content"] == [{"type": "text", "text": _expected(question, scenes)}]
        kinds |= {"two images"} if len(images) == 2 else set()
        kinds |= {"multi-turn"} if len(msgs) > 2 else set()
    return kinds


def test_dataset_is_deterministic_and_answers_match_images(tmp_path):
    a = demo.make_shapes_dataset(tmp_path / "a", n_train=60, n_eval=10, seed=3)
    b = demo.make_shapes_dataset(tmp_path / "b", n_train=60, n_eval=10, seed=3)
    c = demo.make_shapes_dataset(tmp_path / "c", n_train=60, n_eval=10, seed=4)
    for split in ("train.jsonl", "eval.jsonl"):
        assert (a / split).read_text() == (b / split).read_text() != (c / split).read_text()
    files = sorted(p.name for p in (a / "images").iterdir())
    assert files == sorted(p.name for p in (b / "images").iterdir())
    for name in files:
        assert np.array_equal(
            np.array(Image.open(a / "images" / name)), np.array(Image.open(b / "images" / name))
        )
    assert Image.open(a / "images" / files[0]).size == (56, 56)
    assert _check_rows(a / "train.jsonl") == {"system", "two images", "multi-turn"}
    _check_rows(a / "eval.jsonl")


def test_shipped_shapes_data(tmp_path):
    assert len(_rows(SHIPPED / "train.jsonl")) == 256 and len(_rows(SHIPPED / "eval.jsonl")) == 32
    assert _check_rows(SHIPPED / "train.jsonl") == {"system", "two images", "multi-turn"}
    _check_rows(SHIPPED / "eval.jsonl")
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 400_000
    demo._main(["make-data", str(tmp_path / "regen")])  # the shipped copy is exactly the generator's output
    for split in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "regen" / split).read_text() == (SHIPPED / split).read_text()


def test_messages_example():
    path = ROOT / "data_templates" / "messages-example.jsonl"
    rows = _rows(path)
    assert len(rows) == 3
    for row in rows:
        for m in row["messages"]:
            assert m["role"] in ("system", "user", "assistant")
            for c in m["content"]:
                assert c["type"] in ("text", "image")
                if c["type"] == "image":
                    assert (path.parent / c["image"]).is_file()
    _check_rows(path)
