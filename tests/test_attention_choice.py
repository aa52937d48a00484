"""`attn_implementation: auto` picks flash_attention_2 only for model classes that run it; asking for it
explicitly on one that does not is a recipe error naming the field."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import vlmtune
from vlmtune import families
from vlmtune.families import Family
from vlmtune.modeling import check_runtime, runtime_for

from .test_training import SHAPES


class _NoFlash:  # stands in for a transformers class that refuses flash_attention_2
    _supports_flash_attn = False


class _Flash:
    _supports_flash_attn = True


@pytest.fixture
def on_cuda_with_flash_attn(monkeypatch):
    """A machine with a CUDA GPU and flash-attn installed, as runtime_for and check_runtime see it."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else find_spec(name, *a))
    classes = {"_NoFlashModel": _NoFlash, "_FlashModel": _Flash}
    monkeypatch.setattr(Family, "load_class", lambda self: classes[self.model_class])


def _family(model_class: str):
    return dataclasses.replace(families.get(families.names()[0]), model_class=model_class)


def _recipe(attn: str):
    return vlmtune.load_recipe(None, overrides={"model.name_or_path": "builtin:tiny-qwen2-vl",
                                                "model.attn_implementation": attn, "data.train": str(SHAPES / "train.jsonl")})


def test_auto_attention_uses_flash_attention_only_where_the_model_class_runs_it(on_cuda_with_flash_attn):
    assert runtime_for(_recipe("auto"), _family("_FlashModel")).attn_implementation == "flash_attention_2"
    assert runtime_for(_recipe("auto"), _family("_NoFlashModel")).attn_implementation == "sdpa"


def test_flash_attention_asked_of_a_model_class_without_it_is_a_recipe_error(on_cuda_with_flash_attn):
    recipe = _recipe("flash_attention_2")
    assert check_runtime(recipe, _family("_FlashModel")) == []
    (err,) = check_runtime(recipe, _family("_NoFlashModel"))
    assert err.path == "model.attn_implementation"
    assert "does not support flash_attention_2" in str(err) and "use sdpa" in str(err)
