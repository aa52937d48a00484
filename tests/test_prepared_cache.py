"""The prepared-data cache: a second preparation loads what the first stored, and any change that shapes the
examples (data bytes, data.* fields, chat template, an image file) makes a new entry."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import vlmtune
from vlmtune.data import prepare as prepare_module
from vlmtune.data import prepared_cache
from vlmtune.preflight import check_data, formatting_for
from vlmtune.validation import validate

from .conftest import BUILTIN, FAMILIES


def _data(tmp_path):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "What colour?"}]},
                          {"role": "assistant", "content": "green"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(path, family="qwen2_vl", **overrides):
    return vlmtune.load_recipe(None, overrides={"model.name_or_path": f"builtin:{BUILTIN[family]}", "data.train": str(path),
                                                "data.cache": True, **overrides})


def _prepare(recipe):
    _, family, formatter = formatting_for(recipe)
    splits, problems = check_data(recipe, family, formatter)
    return splits["train"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "prepared"


def _no_formatting(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("formatted again instead of loading the cache")

    monkeypatch.setattr(prepare_module, "format_example", refuse)


@pytest.mark.parametrize("family", FAMILIES)
def test_second_preparation_loads_equal_examples(tmp_path, cache_dir, monkeypatch, family):
    recipe = _recipe(_data(tmp_path), family)
    first = _prepare(recipe)
    assert len(first.examples) == 2 and len(list(cache_dir.iterdir())) == 1
    _no_formatting(monkeypatch)
    second = _prepare(recipe)
    assert second == first


def test_cache_off_formats_every_time(tmp_path, cache_dir, monkeypatch):
    recipe = _recipe(_data(tmp_path), **{"data.cache": False})
    _prepare(recipe)
    assert not cache_dir.exists()
    _no_formatting(monkeypatch)
    with pytest.raises(AssertionError, match="formatted again"):  # nothing is loaded: it formats again
        _prepare(recipe)


@pytest.mark.parametrize("change", ["data file", "max_length", "train_on", "image file"])
def test_a_change_that_shapes_the_examples_misses(tmp_path, cache_dir, change):
    path = _data(tmp_path)
    first = _prepare(_recipe(path))
    overrides = {}
    if change == "data file":
        path.write_text(path.read_text().replace("green", "bright green"))
    elif change == "max_length":
        overrides = {"data.max_length": 1024}
    elif change == "train_on":
        overrides = {"data.train_on": "all"}
    else:
        Image.new("RGB", (96, 64), (10, 200, 30)).save(tmp_path / "a.png")  # another size: other image tokens
    second = _prepare(_recipe(path, **overrides))
    assert (second != first or change == "max_length") and second == _prepare(_recipe(path, **{**overrides, "data.cache": False}))
    # a changed image is found on load (size and mtime) and its entry rebuilt in place; the rest make a new key
    assert len(list(cache_dir.iterdir())) == (1 if change == "image file" else 2)


def test_a_changed_chat_template_changes_the_key(tmp_path):
    path = _data(tmp_path)
    recipe = _recipe(path)
    _, family, formatter = formatting_for(recipe)
    options = {"check_images": "auto", "find_shrinkable": False}
    before = prepared_cache.cache_key(path, recipe.data, family.name, formatter.processor, options)
    formatter.processor.chat_template = formatter.processor.chat_template + "{# changed #}"
    assert prepared_cache.cache_key(path, recipe.data, family.name, formatter.processor, options) != before


def test_a_field_that_does_not_shape_the_examples_hits(tmp_path, cache_dir, monkeypatch):
    path = _data(tmp_path)
    _prepare(_recipe(path))
    _no_formatting(monkeypatch)
    assert len(_prepare(_recipe(path, **{"train.learning_rate": 1e-5, "data.num_workers": 3})).examples) == 2
    assert len(list(cache_dir.iterdir())) == 1


@pytest.mark.parametrize("damage", ["meta.json", "tokens.npz", "examples.jsonl"])
def test_a_broken_entry_is_ignored_and_rebuilt(tmp_path, cache_dir, damage):
    recipe = _recipe(_data(tmp_path))
    first = _prepare(recipe)
    entry, = cache_dir.iterdir()
    (entry / damage).write_bytes(b"{not what was written")
    assert _prepare(recipe) == first
    assert prepared_cache.load(entry.name) == first  # rebuilt in place


def test_validate_uses_the_cache(tmp_path, cache_dir, monkeypatch):
    recipe = _recipe(_data(tmp_path))
    first = validate(recipe)
    _no_formatting(monkeypatch)
    second = validate(recipe)
    assert second.splits["train"] == first.splits["train"] and not second.problems


def test_training_after_validate_loads_validates_entry(tmp_path, cache_dir, monkeypatch):
    recipe = _recipe(_data(tmp_path))
    checked = validate(recipe)
    _no_formatting(monkeypatch)
    trained = _prepare(recipe)  # training's preparation: no search for shrinkable rows
    assert trained.examples == checked.splits["train"].examples
    assert len(list(cache_dir.iterdir())) == 1
