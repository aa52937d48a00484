"""The prepared-data cache is always right: every data.* field, data file (a LLaMA-Factory entry's too),
processor file, library version and media change misses it; `inspect` reads and writes it as training does."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import pytest
from PIL import Image

import vlmtune
from vlmtune.config.schema import DataConfig
from vlmtune.data import prepare as prepare_module
from vlmtune.data import prepared_cache
from vlmtune.inspection import inspect
from vlmtune.preflight import formatting_for

from .conftest import BUILTIN, FAMILIES
from .test_prepared_cache import _no_formatting, _prepare

OPTIONS = {"check_images": "auto", "find_shrinkable": False}


def _rows(tmp_path):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "a.png")
    image = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "What colour?"}]},
                          {"role": "assistant", "content": "green"}]}
    text = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]}
    missing = {"messages": [{"role": "user", "content": [{"type": "image", "image": "none.png"},
                                                         {"type": "text", "text": "?"}]},
                            {"role": "assistant", "content": "x"}]}
    return [image, long, text, missing, text]


def _data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(tmp_path)))
    return path


def _recipe(path, family="qwen2_vl", **overrides):
    return vlmtune.load_recipe(None, overrides={"model.name_or_path": f"builtin:{BUILTIN[family]}", "data.train": str(path),
                                                "data.max_length": 200, "data.cache": True, **overrides})


def _key(recipe, data=None):
    _, family, formatter = formatting_for(recipe)
    data = data or recipe.data
    return prepared_cache.cache_key(data.train, data, family.name, formatter.processor, OPTIONS)


def _changed(value, hint):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, dict):
        return {**value, "changed": "x"}
    return f"{value}-changed" if value else ("changed" if "str" in str(hint) else 7)


def test_every_data_field_but_the_loading_ones_is_in_the_key(tmp_path):
    recipe = _recipe(_data(tmp_path))
    before = _key(recipe)
    fields = [f for f in dataclasses.fields(DataConfig) if f.name not in prepared_cache._UNUSED_FIELDS]
    assert {f.name for f in fields} >= {"max_length", "train_on", "max_pixels", "format", "columns", "image_root"}
    for f in fields:
        data = dataclasses.replace(recipe.data, **{f.name: _changed(getattr(recipe.data, f.name), f.type)})
        assert _key(recipe, data) != before, f.name
    # the fields left out do not shape the examples: the split's path (its bytes are hashed), loading, the guard
    assert prepared_cache._UNUSED_FIELDS == {"train", "eval", "num_workers", "prefetch_factor", "max_bad_samples",
                                             "cache", "near_duplicate_distance"}
    quiet = dataclasses.replace(recipe.data, num_workers=3, max_bad_samples=0, eval=str(tmp_path / "e.jsonl"))
    assert _key(recipe, quiet) == before


def test_a_changed_processor_file_or_library_misses(tmp_path, model_dir, monkeypatch):
    path = _data(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(model_dir("qwen2_vl"), model)
    recipe = _recipe(path, **{"model.name_or_path": str(model)})
    before = _key(recipe)
    config = json.loads((model / "processor_config.json").read_text())
    image = config["image_processor"]
    image["merge_size"] = 1 if image.get("merge_size") == 2 else 2
    (model / "processor_config.json").write_text(json.dumps(config))
    assert _key(recipe) != before
    edited = _key(recipe)
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text() + "{# edited #}")
    assert _key(recipe) != edited
    edited = _key(recipe)
    real = prepared_cache._library_versions
    monkeypatch.setattr(prepared_cache, "_library_versions", lambda: {**real(), "transformers": "0.0.1"})
    assert _key(recipe) != edited


def test_a_llamafactory_entrys_files_are_hashed(tmp_path, cache_dir):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say yo", "output": "yo"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "rows.json"}}))
    ref = f"{tmp_path / 'dataset_info.json'}#mine"
    recipe = _recipe(ref)
    assert prepared_cache.data_files(ref) == [tmp_path / "dataset_info.json", rows]
    first = _prepare(recipe)
    rows.write_text(json.dumps([{"instruction": "Say hi", "output": "hello there"}]))
    second = _prepare(recipe)
    assert len(second.examples) == 1 and second != first
    assert second == _prepare(_recipe(ref, **{"data.cache": False}))


def test_an_image_replaced_keeping_its_size_and_mtime_misses(tmp_path, cache_dir):
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.bmp"}, {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "a shape"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    image = tmp_path / "b.bmp"
    Image.new("RGB", (64, 128), (10, 200, 30)).save(image)
    first = _prepare(_recipe(path))
    stat = image.stat()
    other = tmp_path / "other.bmp"
    Image.new("RGB", (128, 64), (10, 200, 30)).save(other)  # uncompressed, rows a multiple of 4 bytes: same size
    assert other.stat().st_size == stat.st_size
    os.replace(other, image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or `rsync -t` leave a copy
    second = _prepare(_recipe(path))
    assert second.examples[0].grids != first.examples[0].grids
    assert second == _prepare(_recipe(path, **{"data.cache": False}))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "prepared"


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_uses_the_cache(tmp_path, cache_dir, monkeypatch, family):
    path = _data(tmp_path)
    plain = inspect(_recipe(path, family, **{"data.cache": False}), num=10).samples
    first = inspect(_recipe(path, family), num=10).samples
    assert len(list(cache_dir.iterdir())) == 1  # the entry training would load
    assert [(s.index, s.source, s.dropped, s.problem) for s in first] == \
        [(s.index, s.source, s.dropped, s.problem) for s in plain]
    kept = [s for s in plain if not s.dropped and s.problem is None]
    assert len(kept) == 3 and [s.input_ids for s in first if s.input_ids] == [s.input_ids for s in kept]
    assert [s.labels for s in first if s.input_ids] == [s.labels for s in kept]
    _no_formatting(monkeypatch)
    again = inspect(_recipe(path, family), index=2)
    assert [(s.index, s.input_ids) for s in again.samples] == [(2, plain[2].input_ids)]
    assert _prepare(_recipe(path, family)).examples  # training loads the same entry
    assert len(list(cache_dir.iterdir())) == 1
    with pytest.raises(AssertionError, match="formatted again"):  # off: formats every time (the test can fail)
        inspect(_recipe(path, family, **{"data.cache": False}))


def test_format_example_is_what_a_miss_calls(tmp_path, cache_dir, monkeypatch):
    """The counting the tests above rely on: preparing calls prepare.format_example once per formatted row."""
    calls = []
    real = prepare_module.format_example
    monkeypatch.setattr(prepare_module, "format_example", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = _data(tmp_path)
    _prepare(_recipe(path))
    assert len(calls) == 4  # every row but the one whose image is missing
    _prepare(_recipe(path))
    assert len(calls) == 4


def test_a_cache_that_cannot_be_written_is_no_error(tmp_path, model_dir, monkeypatch, capsys):
    model = {"model.name_or_path": str(model_dir("qwen2_vl"))}  # built before the cache is blocked
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache would be")
    monkeypatch.setenv("VLMTUNE_CACHE", str(blocked))
    path = _data(tmp_path)
    data = _prepare(_recipe(path, **model))
    assert data == _prepare(_recipe(path, **model, **{"data.cache": False})) and len(data.examples) == 3
    assert "prepared data not cached in " in capsys.readouterr().err


def test_least_recently_used_entries_go_past_the_size_limit(tmp_path, cache_dir, monkeypatch):
    paths = []
    for name in ("a", "b", "c"):
        path = tmp_path / name / "d.jsonl"
        path.parent.mkdir()
        path.write_text(_data(tmp_path).read_text().replace("green", f"green {name}"))
        paths.append(path)
    _prepare(_recipe(paths[0]))
    entry_a, = cache_dir.iterdir()
    size = sum(p.stat().st_size for p in entry_a.rglob("*") if p.is_file())
    monkeypatch.setenv(prepared_cache.LIMIT_VARIABLE, str(2.5 * size / 2**30))  # room for two entries
    _prepare(_recipe(paths[1]))
    entry_b, = set(cache_dir.iterdir()) - {entry_a}
    hour = 3600
    for entry, age in ((entry_a, 2 * hour), (entry_b, hour)):  # a older than b, unless a load marks its use
        os.utime(entry / "meta.json", (time.time() - age, time.time() - age))
    assert prepared_cache.load(entry_a.name) is not None  # a used again: now b is the least recently used
    _prepare(_recipe(paths[2]))
    left = set(cache_dir.iterdir())
    assert entry_a in left and entry_b not in left and len(left) == 2


def test_every_field_of_the_prepared_data_round_trips(cache_dir):
    """A field added to Example, VideoClip or PreparedData that the cache does not store would come back as its
    default from every cached run: each one set to a non-default value must survive store + load."""
    from vlmtune.data.formats import RowProblem
    from vlmtune.data.prepare import Example, PreparedData
    from vlmtune.data.video import VideoClip

    clip = VideoClip(("f0.png", "f1.png"), (0, 1), (2, 4, 4), 8, 1.0, 2.0)
    example = Example([1, 2, 3], [-100, 2, 3], ["a.png"], [(1, 4, 4)], "d.jsonl:1", 12544, [clip], [(0, 1, "image")])
    problem = RowProblem("d.jsonl", 2, "why", unreadable=True)
    data = PreparedData([example], [problem], [problem], [problem], [problem], 5, 1, [problem], 2, 3)
    assert [f.name for f in dataclasses.fields(Example)] == ["input_ids", "labels", "images", "grids", "source",
                                                             "max_pixels", "videos", "media"]
    assert [f.name for f in dataclasses.fields(VideoClip)] == ["source", "indices", "grid", "tokens",
                                                               "seconds_per_grid", "frame_rate"]
    assert [f.name for f in dataclasses.fields(PreparedData)] == ["examples", "problems", "dropped", "duplicates",
                                                                  "warnings", "rows", "shrunk", "shrinkable",
                                                                  "decoded", "header_only"]
    for value, cls in ((example, Example), (clip, VideoClip), (data, PreparedData)):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert getattr(value, f.name) != default, f"{cls.__name__}.{f.name} is left at its default"
    prepared_cache.store("k" * 40, data, {})
    assert prepared_cache.load("k" * 40) == data


def test_the_cache_is_on_by_default_and_a_change_misses_it(tmp_path, cache_dir, monkeypatch):
    path = _data(tmp_path)
    plain = {"model.name_or_path": f"builtin:{BUILTIN['qwen2_vl']}", "data.train": str(path)}
    recipe = vlmtune.load_recipe(None, overrides=plain)
    assert recipe.data.cache is True
    first = _prepare(recipe)
    assert len(list(cache_dir.iterdir())) == 1
    path.write_text(path.read_text().replace("hello", "hello there"))  # a changed data file
    changed = _prepare(recipe)
    assert changed != first and len(list(cache_dir.iterdir())) == 2
    assert _prepare(vlmtune.load_recipe(None, overrides={**plain, "data.train_on": "all"})) != changed  # a data.* field
    assert len(list(cache_dir.iterdir())) == 3
    _no_formatting(monkeypatch)
    assert _prepare(recipe) == changed  # unchanged: loaded
