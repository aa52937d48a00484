"""The frozen-vision feature cache (train.cache_vision_features): cached features give the same loss and
gradients as the vision tower (every family; packed rows too), the tower is not run once the cache is built, a
second run reuses it, changed media or pixel bounds miss, a damaged entry is rebuilt, the size is printed and a
full disk refused, and auto / true / false decide as documented."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmtune
from tests.conftest import BUILTIN, FAMILIES
from vlmtune import families
from vlmtune.data.collator import collator_for
from vlmtune.data.dataset import to_dataset
from vlmtune.data.packing import packed_dataset, packing_collator_for
from vlmtune.disk import DiskFullError
from vlmtune.training import build_trainer
from vlmtune.vision_cache import FeatureStore, MediaHasher, decide, model_key, problems, setting
from vlmtune.vision_cache_prepass import encode

PACKING = [f for f in FAMILIES if families.get(f).packs]
VIDEO = [f for f in FAMILIES if families.get(f).takes_video()]


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vc-images")
    out = {}
    for name, size, colour in (("red", (56, 56), (255, 0, 0)), ("wide", (120, 40), (0, 0, 255)),
                               ("tall", (30, 90), (0, 200, 0))):
        out[name] = root / f"{name}.png"
        Image.new("RGB", size, colour).save(out[name])
    for k in range(4):
        out[f"frame{k}"] = root / f"frame{k}.png"
        Image.new("RGB", (56, 56), (60 * k, 0, 200 - 40 * k)).save(out[f"frame{k}"])
    return out


def write_rows(layouts, media, question: str, reply: str, folder: Path) -> Path:
    """A messages JSONL file, one row per layout: its media parts (a media name or a ready part), then a text."""
    lines = []
    for i, parts in enumerate(layouts):
        content = [p if isinstance(p, dict) else {"type": "image", "image": str(media[p])} for p in parts]
        content.append({"type": "text", "text": question * (1 + i % 3)})
        lines.append(json.dumps({"messages": [{"role": "user", "content": content},
                                              {"role": "assistant", "content": f"{reply} {i} " * (1 + i % 2)}]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def mixed_data(media, tmp_path_factory) -> Path:
    """Six rows: one, two and no images, so batches join different numbers of images per example."""
    layouts = [["red"], ["wide", "tall"], [], ["tall"], ["red", "wide"], ["wide"]]
    return write_rows(layouts, media, "what is shown here ", "answer number", tmp_path_factory.mktemp("vc-data"))


@pytest.fixture(scope="module")
def video_data(media, tmp_path_factory) -> Path:
    """Six rows: a video (frame list) with and without an image, images alone, text alone."""
    video = {"type": "video", "video": [str(media[f"frame{k}"]) for k in range(4)]}
    layouts = [[video, "red"], ["wide"], [video], [], ["tall", video], [video]]
    return write_rows(layouts, media, "what happens ", "reply", tmp_path_factory.mktemp("vc-video"))


def recipe_for(family: str, data: Path, out: Path, **overrides):
    fields = {"model.name_or_path": f"builtin:{BUILTIN[family]}", "data.train": str(data), "output_dir": str(out),
              "train.max_steps": 2, "train.per_device_train_batch_size": 3, "train.gradient_accumulation_steps": 1,
              "train.learning_rate": 1e-2, "train.lr_scheduler_type": "constant", "train.warmup_ratio": 0.0,
              "train.logging_steps": 1, "train.save_steps": 1000, "train.gradient_checkpointing": False,
              "data.num_workers": 0, "lora.dropout": 0.0, "model.dtype": "float32"}
    fields.update(overrides)
    return vlmtune.load_recipe(None, overrides=fields)


def fresh_cache(monkeypatch, tmp_path: Path) -> Path:
    """An empty vision cache for this test (the built-in models stay where the session made them)."""
    import vlmtune.vision_cache_prepass

    root = tmp_path / "vision-cache"
    monkeypatch.setattr(vlmtune.vision_cache_prepass, "cache_root", lambda: root)
    return root


def with_setting(plan, value, **train):
    recipe = copy.deepcopy(plan.recipe)
    recipe.train.cache_vision_features = value
    for k, v in train.items():
        setattr(recipe.train, k, v)
    return dataclasses.replace(plan, recipe=recipe)


class Raising:
    """A forward hook that fails the test if the vision tower runs."""

    def __call__(self, *args):
        raise AssertionError("the vision tower ran although its features were cached")


def vision_module(trainer, family):
    return trainer.model.get_base_model().get_submodule(family.vision_prefix)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------- training: cached = uncached, every family
@pytest.mark.parametrize("family", FAMILIES)
def test_training_with_cached_features_gives_the_same_losses_without_running_the_tower(
        family, mixed_data, tmp_path, monkeypatch):
    fresh_cache(monkeypatch, tmp_path)
    fam = families.get(family)
    plan = vlmtune.plan(recipe_for(family, mixed_data, tmp_path / "out"))
    plain, _ = build_trainer(with_setting(plan, "false"), tmp_path / "a", log=_quiet)
    plain.train()
    assert not plain.vision_cache.on and plain.vision_cache.calls.calls > 0
    cached, _ = build_trainer(with_setting(plan, "true"), tmp_path / "b", log=_quiet)
    vc = cached.vision_cache
    assert vc.on and vc.misses == 5 and vc.hits == 0 and vc.prepass_calls >= 5  # one text-only row: no entry
    handle = vision_module(cached, fam).register_forward_hook(Raising())
    cached.train()
    handle.remove()
    assert len(losses(plain)) == 2
    torch.testing.assert_close(losses(cached), losses(plain), rtol=1e-5, atol=0)
    assert vc.metrics()["vision_tower_calls_in_training"] == 0 and vc.metrics()["vision_cache_bytes"] > 0


# ---------------------------------------------------------------- one batch: loss and LoRA gradients, packed too
def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


CASES = ([(f, "images", False) for f in FAMILIES] + [(f, "images", True) for f in PACKING]
         + [(f, "video", p) for f in VIDEO for p in (False, True) if f in PACKING or not p])


@pytest.mark.parametrize(("family", "media_kind", "packed"), CASES,
                         ids=[f"{f}-{m}-{'packed' if p else 'rows'}" for f, m, p in CASES])
def test_a_batch_from_stored_features_gives_the_same_loss_and_gradients(family, media_kind, packed, lora_model,
                                                                        mixed_data, video_data, tmp_path):
    data = video_data if media_kind == "video" else mixed_data
    plan = vlmtune.plan(recipe_for(family, data, tmp_path / "out"))
    fam, processor, examples = plan.family, plan.processor, plan.train.examples
    pad = processor.tokenizer.pad_token_id or 0
    model = lora_model(family)
    store, hasher = FeatureStore(tmp_path / "store"), MediaHasher()
    keys = [hasher.key(e) for e in examples]
    one = collator_for(fam, pad)
    plain = to_dataset(examples, fam, processor, plan.model_config)
    for i, key in enumerate(keys):
        if key:
            store.write(key, encode(model, fam, one([plain[i]]), "cpu"))
    cached = to_dataset(examples, fam, processor, plan.model_config, features=store.read, feature_keys=keys)
    if packed:
        collate = packing_collator_for(fam, pad)
        plain, cached = (packed_dataset(d, [[0, 1, 2], [3, 4, 5]]) for d in (plain, cached))
        rows = [0, 1]
    else:
        collate, rows = one, list(range(len(examples)))
    batch_plain = collate([plain[i] for i in rows])
    batch_cached = collate([cached[i] for i in rows])
    pixels = "pixel_values_videos" if media_kind == "video" else "pixel_values"
    assert pixels in batch_plain and pixels not in batch_cached
    kinds = {"image", "video"} if media_kind == "video" else {"image"}
    assert set(batch_cached["mm_encoder_outputs"]) == kinds
    loss_p, grads_p = _loss_and_grads(model, batch_plain)
    loss_c, grads_c = _loss_and_grads(model, batch_cached)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=0)
    assert grads_p.keys() == grads_c.keys()
    for name, g in grads_p.items():
        assert (grads_c[name] - g).norm() <= 1e-5 * g.norm() + 1e-12, name


# ---------------------------------------------------------------- reuse, misses, damage, disk
def test_second_run_reuses_the_cache_and_reports_it(mixed_data, tmp_path, monkeypatch):
    fresh_cache(monkeypatch, tmp_path)
    recipe = recipe_for("qwen2_vl", mixed_data, tmp_path / "out", **{"train.num_train_epochs": 2, "train.max_steps": -1,
                                                                    "data.eval": str(mixed_data)})  # eval: cached too
    lines = []
    result = vlmtune.train(recipe, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any(line.startswith("vision feature cache: on (the vision side is frozen and the run sees its data 2")
               for line in lines), lines
    assert any("media tokens x" in line for line in lines)  # the size, printed before writing
    saved = json.loads((result.output_dir / "train_results.json").read_text())
    assert saved["vision_cache"] is True and saved["vision_cache_misses"] == 5
    assert saved["vision_tower_calls"] == saved["vision_cache_misses"] and saved["vision_tower_calls_in_training"] == 0
    assert saved["eval_loss"] > 0
    plan = vlmtune.plan(recipe)
    again, _ = build_trainer(plan, tmp_path / "ck", log=_quiet)
    vc = again.vision_cache
    assert (vc.hits, vc.misses, vc.prepass_calls, vc.written_bytes) == (5, 0, 0, 0)
    assert vc.metrics()["vision_cache_bytes"] == saved["vision_cache_bytes"] > 0


def test_a_killed_prepass_resumes_and_a_damaged_entry_is_rebuilt(mixed_data, tmp_path, monkeypatch):
    root = fresh_cache(monkeypatch, tmp_path)
    plan = with_setting(vlmtune.plan(recipe_for("qwen2_vl", mixed_data, tmp_path / "out")), "true")
    write, written = FeatureStore.write, []

    def killed_after_two(self, key, entry):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(key)
        return write(self, key, entry)

    monkeypatch.setattr(FeatureStore, "write", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(plan, tmp_path / "a", log=_quiet)
    monkeypatch.setattr(FeatureStore, "write", write)
    assert len(list(root.rglob("*.safetensors"))) == 2 and not list(root.rglob(".*.tmp-*"))  # only whole entries
    resumed, _ = build_trainer(plan, tmp_path / "b", log=_quiet)
    vc = resumed.vision_cache
    assert (vc.hits, vc.misses, vc.rebuilt) == (2, 3, 0)
    store, key = vc.store, vc.train_keys[0]
    path = store.path(key)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short
    assert not store.valid(key) and store.read(key) is None
    again, _ = build_trainer(plan, tmp_path / "c", log=_quiet)
    vc = again.vision_cache
    assert (vc.hits, vc.misses, vc.rebuilt) == (4, 1, 1) and store.valid(key)
    again.train()
    assert vc.metrics()["vision_tower_calls_in_training"] == 0


def test_changed_image_or_pixel_bound_misses(media, mixed_data, tmp_path, monkeypatch):
    fresh_cache(monkeypatch, tmp_path)
    plan = vlmtune.plan(recipe_for("qwen2_vl", mixed_data, tmp_path / "out"))
    example = plan.train.examples[0]
    index = tmp_path / "digests.json"
    hasher = MediaHasher(index)
    before = hasher.key(example)
    hasher.save()
    assert str(example.images[0]) in json.loads(index.read_text())  # a later run reads only changed files
    assert MediaHasher(index).key(example) == MediaHasher().key(example) == before
    assert MediaHasher().key(plan.train.examples[2]) is None
    image = Path(example.images[0])
    original = image.read_bytes()
    try:
        Image.new("RGB", (56, 56), (254, 0, 0)).save(image)  # same size and grid, other pixels
        assert MediaHasher(index).key(example) != before
    finally:
        image.write_bytes(original)
    assert MediaHasher().key(dataclasses.replace(example, max_pixels=3136)) != before  # a shrunk sample
    bounded = vlmtune.plan(recipe_for("qwen2_vl", mixed_data, tmp_path / "out", **{"data.max_pixels": 200_704}))
    assert model_key(bounded)[0] != model_key(plan)[0]  # the recipe's pixel bounds are in the model's key
    assert model_key(plan)[0] == model_key(vlmtune.plan(plan.recipe))[0]


def test_a_same_size_rewrite_that_keeps_the_mtime_misses(tmp_path):
    """cp -p / rsync -t: other bytes, the same size, the old mtime restored; only the ctime tells."""
    import os
    import time

    path, index = tmp_path / "a.png", tmp_path / "digests.json"
    path.write_bytes(b"\x00" * 64)
    hasher = MediaHasher(index)
    before = hasher.file(str(path))
    hasher.save()
    st = os.stat(path)
    for _ in range(100):  # the ctime ticks with the kernel's clock: rewrite until it has moved on
        path.write_bytes(b"\x01" * 64)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = os.stat(path)
        if now.st_ctime_ns != st.st_ctime_ns:
            break
        time.sleep(0.01)
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and now.st_ctime_ns != st.st_ctime_ns
    assert MediaHasher(index).file(str(path)) != before
    assert MediaHasher(index).file(str(path)) == MediaHasher().file(str(path))


def test_size_is_printed_and_a_full_disk_refused_before_writing(mixed_data, tmp_path, monkeypatch):
    import vlmtune.disk

    fresh_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(vlmtune.disk, "free_bytes", lambda path: 1000)
    plan = with_setting(vlmtune.plan(recipe_for("qwen2_vl", mixed_data, tmp_path / "out")), "true")
    lines = []
    with pytest.raises(DiskFullError, match="the vision feature cache was not built: not enough disk space"):
        build_trainer(plan, tmp_path / "a", log=lines.append)
    assert any("media tokens x" in line and "bytes = about" in line for line in lines), lines
    assert not list((tmp_path / "vision-cache").rglob("*.safetensors"))


# ---------------------------------------------------------------- the size limit ($VLMTUNE_VISION_CACHE_GB)
def _fake_entry(root: Path, model: str, key: str, size: int, age_s: float) -> Path:
    import os
    import time

    path = root / model / key[:2] / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    (root / model / "model.json").write_text("{}")
    used = time.time() - age_s
    os.utime(path, (used, used))
    return path


def test_prune_removes_the_least_recently_used_entries_of_any_model_but_never_the_runs(tmp_path):
    from vlmtune.vision_cache import prune

    root = tmp_path / "vision"
    oldest = _fake_entry(root, "m1", "aa01", 400, age_s=300)
    kept_old = _fake_entry(root, "m2", "bb01", 400, age_s=400)  # older still, but the run reads it
    middle = _fake_entry(root, "m3", "cc01", 400, age_s=200)
    recent = _fake_entry(root, "m1", "aa02", 400, age_s=100)
    lines = []
    assert prune(root, {kept_old}, limit=800, log=lines.append) == 800
    assert not oldest.exists() and not middle.exists() and recent.exists() and kept_old.exists()
    assert not (root / "m3").exists() and (root / "m1" / "model.json").exists()  # an emptied model folder goes
    assert len(lines) == 1 and "$VLMTUNE_VISION_CACHE_GB" in lines[0]
    assert prune(root, set(), limit=800, log=lines.append) == 0 and len(lines) == 1  # under the limit: nothing


def test_the_limit_evicts_other_entries_and_refuses_a_run_that_alone_exceeds_it(mixed_data, tmp_path, monkeypatch):
    root = fresh_cache(monkeypatch, tmp_path)
    stale = _fake_entry(root, "other-model", "dd01", 200_000, age_s=86400)
    plan = vlmtune.plan(recipe_for("qwen2_vl", mixed_data, tmp_path / "out"))
    monkeypatch.setenv("VLMTUNE_VISION_CACHE_GB", "1e-7")  # about 107 bytes: less than one entry
    lines = []
    auto, _ = build_trainer(with_setting(plan, "auto", max_steps=4), tmp_path / "a", log=lines.append)
    vc = auto.vision_cache
    assert not vc.on and "over the 1e-07 GiB of $VLMTUNE_VISION_CACHE_GB" in vc.reason
    assert any("media tokens x" in line and "limit 1e-07 GiB" in line for line in lines), lines
    assert list(root.rglob("*.safetensors")) == [stale]  # nothing written, nothing pruned
    assert vc.dataset_args("train") == {}  # training runs the tower
    with pytest.raises(vlmtune.VlmtuneError, match="cannot be|over the 1e-07 GiB.*raise \\$VLMTUNE_VISION_CACHE_GB"):
        build_trainer(with_setting(plan, "true"), tmp_path / "b", log=_quiet)

    monkeypatch.setenv("VLMTUNE_VISION_CACHE_GB", "100")
    first, _ = build_trainer(with_setting(plan, "true"), tmp_path / "c", log=_quiet)
    own = first.vision_cache.metrics()["vision_cache_bytes"]
    assert own > 0 and stale.exists()  # under the limit: kept
    entries = sorted({first.vision_cache.store.path(k) for k in first.vision_cache.train_keys if k})
    entries[0].unlink()  # one to write again, so the next run prunes
    monkeypatch.setenv("VLMTUNE_VISION_CACHE_GB", str((own + 100_000) / 2**30))
    lines = []
    again, _ = build_trainer(with_setting(plan, "true"), tmp_path / "d", log=lines.append)
    assert again.vision_cache.misses == 1 and all(p.exists() for p in entries)  # the run's own entries stay
    assert not stale.exists() and not (root / "other-model").exists()
    assert any(line.startswith("vision feature cache over ") for line in lines), lines


# ---------------------------------------------------------------- auto / true / false
@pytest.fixture(scope="module")
def qwen_plan(mixed_data, tmp_path_factory):
    return vlmtune.plan(recipe_for("qwen2_vl", mixed_data, tmp_path_factory.mktemp("vc-out")))


FROZEN = {"vision": (0, 10), "projector": (0, 10), "language": (5, 10)}


def test_auto_turns_on_only_when_frozen_and_the_data_is_seen_more_than_once(qwen_plan):
    def on(report=FROZEN, value="auto", **train):
        return decide(with_setting(qwen_plan, value, **train), report)

    assert on(num_train_epochs=2.0, max_steps=-1)[0]
    assert on(max_steps=3)[0]  # 3 steps of 3 rows: 1.5 passes over 6 examples
    flag, why = on(max_steps=2)
    assert not flag and "sees its data 1 time" in why
    assert on(value="true", max_steps=1)[0]  # true: built even for one pass (for later runs)
    assert on(value="false", max_steps=9) == (False, "train.cache_vision_features is false")
    flag, why = on({**FROZEN, "projector": (3, 10)}, max_steps=9)
    assert not flag and "projector parameters train" in why
    with pytest.raises(vlmtune.VlmtuneError, match="cannot be true here: the vision parameters train"):
        on({**FROZEN, "vision": (3, 10)}, value="true")
    assert setting(qwen_plan.recipe) == "auto" and setting(with_setting(qwen_plan, True).recipe) == "true"


def test_true_is_refused_where_it_cannot_work(mixed_data, tmp_path):
    recipe = recipe_for("qwen2_vl", mixed_data, tmp_path / "out", **{"train.cache_vision_features": True,
                                                                    "lora.train_projector": True})
    with pytest.raises(vlmtune.PreflightError, match="train.cache_vision_features: cannot be true here: "
                                                     "lora.train_projector is true"):
        vlmtune.plan(recipe)
    family = families.get("qwen2_vl")
    plain = recipe_for("qwen2_vl", mixed_data, tmp_path / "out", **{"train.cache_vision_features": "true"})
    assert problems(plain, family, zero_stage=0, world_size=1) == []
    assert "ZeRO-3" in str(problems(plain, family, zero_stage=3, world_size=2)[0])
    assert problems(plain, family, zero_stage=2, world_size=2) == []  # rank 0 builds it: tests/test_distributed_vision_cache.py
    plain.lora.modules_to_save = ["merger"]
    assert "modules_to_save trains merger" in str(problems(plain, family, zero_stage=0, world_size=1)[0])
    with pytest.raises(vlmtune.RecipeError, match="train.cache_vision_features: must be one of auto, true, false"):
        recipe_for("qwen2_vl", mixed_data, tmp_path / "out", **{"train.cache_vision_features": "yes"})


# ---------------------------------------------------------------- several processes: the pre-pass split
def test_shares_split_the_missing_entries_by_media_tokens_the_same_way_on_every_rank():
    from vlmtune.vision_cache_ranks import shares

    tokens = [64, 16, 16, 64, 256, 16]
    parts = shares(tokens, 2)
    assert parts == shares(list(tokens), 2)  # every rank computes the same split
    assert sorted(i for p in parts for i in p) == list(range(len(tokens)))  # each entry built once
    assert parts == [[4], [0, 1, 2, 3, 5]]  # the big image alone on one rank: 256 tokens | 176
    assert shares([10, 10, 10], 2, preload=[10, 0]) == [[1], [0, 2]]  # rank 0 already built one
    assert shares([], 3) == [[], [], []] and shares([5, 5], 3) == [[0], [1], []]
