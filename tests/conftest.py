"""Shared fixtures: tiny random models per family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from vlmtune import families


def _reference() -> Path:
    """The real model files in ../shared/reference (or $VLMTUNE_REFERENCE); tests that need them skip without."""
    for candidate in (os.environ.get("VLMTUNE_REFERENCE"), Path(__file__).resolve().parents[2] / "shared" / "reference",
                      "/work/shared/reference"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return Path(__file__).resolve().parents[2] / "shared" / "reference"


REFERENCE = _reference()
FAMILIES = families.names()  # every registered family; a new one is tested by everything here
BUILTIN = {f.name: f.tiny_name for f in families.all_families()}


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory) -> Path:
    """The session's $VLMTUNE_CACHE: always a temporary folder, never the user's cache (even when they set one)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("vlmtune-cache")
    (root / "builtin").mkdir()
    os.environ["VLMTUNE_CACHE"] = str(root)
    return root


@pytest.fixture(autouse=True)
def _own_cache(_offline_cache, tmp_path_factory, monkeypatch):
    """Each test its own $VLMTUNE_CACHE (prepared data, downloaded images), so that no test loads what another
    prepared; the tiny models built once per session are shared. A module that set its own cache keeps it."""
    if os.environ.get("VLMTUNE_CACHE") != str(_offline_cache):
        return
    mine = tmp_path_factory.mktemp("cache")
    (mine / "builtin").symlink_to(_offline_cache / "builtin", target_is_directory=True)
    monkeypatch.setenv("VLMTUNE_CACHE", str(mine))


@pytest.fixture(scope="session")
def model_dir():
    """family name -> local folder of a tiny random model of that family."""
    from vlmtune.demo import builtin_model_path

    return lambda family: builtin_model_path(BUILTIN[family])


@pytest.fixture(scope="session")
def processor_for(model_dir):
    from transformers import AutoProcessor

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = AutoProcessor.from_pretrained(model_dir(family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """A few images of different sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, size, colour in (("red", (56, 56), (255, 0, 0)), ("wide", (120, 40), (0, 0, 255)),
                               ("tall", (30, 90), (0, 200, 0)), ("big", (224, 168), (200, 200, 0))):
        path = root / f"{name}.png"
        Image.new("RGB", size, colour).save(path)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def reference_processor():
    """name -> AutoProcessor of a real model's files in ../shared/reference (the test skips when absent)."""
    from transformers import AutoProcessor

    cache = {}

    def get(name: str):
        ref = REFERENCE / name
        if not ref.is_dir():
            pytest.skip("../shared/reference is not present")
        if name not in cache:
            cache[name] = AutoProcessor.from_pretrained(ref)
        return cache[name]

    return get


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora_model(model_dir):
    """family -> a float32 LoRA model (random A and B, so every adapter weight gets a gradient), built once."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from vlmtune.config.schema import LoraConfig
    from vlmtune.modeling import lora_targets

    cache = {}

    def get(name):
        if name not in cache:
            family = families.get(name)
            torch.manual_seed(0)
            base = family.load_class().from_pretrained(model_dir(name), dtype=torch.float32,
                                                       attn_implementation="sdpa")
            targets = lora_targets(base, family, LoraConfig())
            model = get_peft_model(base, PeftLoraConfig(r=4, target_modules=targets, init_lora_weights=False))
            cache[name] = model.eval()  # eval: no dropout; gradients flow all the same
        return cache[name]

    return get
