"""Building the vision feature cache before training, and counting the vision tower's calls.

What is stored is what the model's own forward computes (vision_encode.py records it). Examples run one at a time (their outputs are
then exactly one example's; the family's `combine_encoder_outputs` joins them per batch), without gradients,
in eval mode, their media decoded by DataLoader workers as in training. Rank 0 finds what is missing and builds
the first missing entry to measure the cache's size; with several processes each rank then builds a share of the
rest (vision_cache_ranks.py)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.collator import collator_for
from .data.dataset import to_dataset
from .disk import check_space, human_size
from .errors import VlmtuneError
from .main_decides import decided_by_main
from .vision_cache import (
    FIELD,
    LIMIT_VARIABLE,
    FeatureStore,
    MediaHasher,
    cache_root,
    decide,
    limit_bytes,
    model_key,
    prune,
    setting,
)
from .vision_cache_ranks import check_shared, failure, meet, said_by_all, shares, where
from .vision_encode import base_model, encode

WHAT = "the vision feature cache was not built"
ADVICE = ("free up space, point $VLMTUNE_CACHE at a larger disk, or set train.cache_vision_features: false")


class VisionCalls:
    """Counts forward calls of the model's vision tower (a forward hook)."""

    def __init__(self, model, family):
        self.calls = 0
        self._handle = base_model(model).get_submodule(family.vision_prefix).register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class VisionCache:
    """The cache of one run: on or off (and why), each example's entry key, and what the pre-pass did."""

    on: bool
    reason: str
    calls: VisionCalls
    store: FeatureStore | None = None
    train_keys: list[str | None] = field(default_factory=list)
    eval_keys: list[str | None] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    written_bytes: int = 0
    prepass_calls: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # entry key -> why its media failed in the pre-pass

    def dataset_args(self, split: str) -> dict:
        """Keyword arguments of `to_dataset` for a split (none when the cache is off)."""
        if not self.on:
            return {}
        return {"features": CacheReader(self.store, self.bad),
                "feature_keys": self.train_keys if split == "train" else self.eval_keys}

    def metrics(self) -> dict:
        return {"vision_cache": self.on, "vision_tower_calls": self.calls.calls,
                "vision_tower_calls_in_training": self.calls.calls - self.prepass_calls,
                "vision_cache_hits": self.hits, "vision_cache_misses": self.misses,
                "vision_cache_rebuilt": self.rebuilt, "vision_cache_written_bytes": self.written_bytes,
                "vision_cache_bytes": self._bytes()}

    def _bytes(self) -> int:
        if not self.on:
            return 0
        total = 0
        for key in {k for k in self.train_keys + self.eval_keys if k}:
            try:
                total += self.store.path(key).stat().st_size
            except OSError:
                pass
        return total


class CacheReader:
    """key -> the stored entry, {"problem": reason} for a row whose media failed in the pre-pass (it is a bad
    sample when it comes up in training, named as the decode named it), or None (missing or damaged)."""

    def __init__(self, store: FeatureStore, bad: dict[str, str]):
        self.store, self.bad = store, bad

    def __call__(self, key: str) -> dict | None:
        if key in self.bad:
            return {"problem": self.bad[key]}
        return self.store.read(key)


# what rank 0 decides and every rank receives
_SHARED = ("on", "reason", "train_keys", "eval_keys", "hits", "misses", "rebuilt", "written_bytes", "bad")


def setup(model, plan, report: dict, workers: int = 0, log=print) -> VisionCache:
    """Decide whether the run uses the cache (one log line says so and why) and, if it does, build what is
    missing. Counts vision tower calls from here on either way. With several processes rank 0 decides (the keys,
    what is missing, its size), every rank builds a share of the missing entries, and all then read the same
    folder (vision_cache_ranks.py)."""
    calls = VisionCalls(model, plan.family)
    on, reason = decide(plan, report)
    log(f"vision feature cache: {'on' if on else 'off'} ({reason})")
    cache = VisionCache(on, reason, calls)
    if not on:
        return cache
    cuda = not plan.recipe.train.use_cpu
    try:  # every VlmtuneError in here is raised by all ranks at once
        decided = decided_by_main(lambda: _on_main(model, plan, cache, log), cuda=cuda)
        for name in _SHARED:
            setattr(cache, name, decided[name])
        cache.store = FeatureStore(cache_root() / decided["model"])  # this process's $VLMTUNE_CACHE, rank 0's key
        if cache.on:
            _build_shares(model, plan, cache, decided, workers, log, cuda)
    except VlmtuneError as e:
        said_by_all(e, cuda)
        raise
    if cache.on:
        _without_dummy_image(model)
    cache.prepass_calls = calls.calls
    return cache


def _without_dummy_image(model) -> None:
    """Take out the dummy image that keeps several processes' vision towers in step (distributed/zero3.py, kept on
    the model by training.py for every run of more than one process): with the vision side frozen and cached no
    rank runs the tower and no rank has a vision gradient to reduce, but the dummy would run it on every text-only
    batch. (Under ZeRO-3, which partitions the tower, the cache is refused.)"""
    in_step = getattr(model, "vlmtune_vision_in_step", None)
    if in_step is not None:
        in_step.remove()
        model.vlmtune_vision_in_step = None


def _examples(plan) -> list:
    """The training then the evaluation examples: what the keys (train_keys + eval_keys) are of."""
    return list(plan.train.examples) + list(plan.eval.examples if plan.eval else [])


def _media_tokens(example) -> int:
    return example.media_tokens("image") + example.media_tokens("video")


def _on_main(model, plan, cache: VisionCache, log) -> dict:
    """`_missing_entries`, its failure named as the pre-pass's on rank 0 for every rank (one process: as it is)."""
    from .distributed import world_size

    try:
        return _missing_entries(model, plan, cache, log)
    except VlmtuneError:
        raise
    except Exception as e:
        if world_size() <= 1:
            raise
        raise failure(f"{where()}: {type(e).__name__}: {e}") from e


def _missing_entries(model, plan, cache: VisionCache, log) -> dict:
    """Rank 0's part: the entry keys, which entries are missing, and their size (the first missing one is built
    to measure it, and refused before it is written when too big); what every rank needs to build the rest."""
    key, described = model_key(plan)
    cache.store = store = FeatureStore(cache_root() / key)
    _describe(store.folder, described)
    hasher = MediaHasher(cache_root() / "media-digests.json")
    cache.train_keys = [hasher.key(e) for e in plan.train.examples]
    cache.eval_keys = [hasher.key(e) for e in (plan.eval.examples if plan.eval else [])]
    hasher.save()
    examples = _examples(plan)
    todo: dict[str, int] = {}  # entry key -> its first example's index in `examples`
    reused = 0  # bytes of the entries already there that this run reads
    for i, k in enumerate(cache.train_keys + cache.eval_keys):
        if k is None or k in todo:
            continue
        if store.valid(k):
            reused += store.touch(k)  # used now: the least recently used entries are pruned first
            continue
        if store.path(k).exists():
            cache.rebuilt += 1
        todo[k] = i
    cache.misses = len(todo)
    cache.hits = len({k for k in cache.train_keys + cache.eval_keys if k}) - cache.misses
    items = [(k, examples[i]) for k, i in todo.items()]
    done = 0
    if items:
        try:
            done = _measured(model, plan, store, items, cache, reused, log)
        except _OverLimit as e:
            if setting(plan.recipe) == "true":
                raise VlmtuneError(f"{FIELD}: {e}; raise ${LIMIT_VARIABLE} or set {FIELD}: false") from None
            cache.on, cache.reason = False, str(e)
            log(f"vision feature cache: off ({e}; raise ${LIMIT_VARIABLE} to cache them)")
    return {**{n: getattr(cache, n) for n in _SHARED}, "model": key, "todo": list(todo.items())[done:],
            "done": done, "done_tokens": sum(_media_tokens(e) for _, e in items[:done])}


def _build_shares(model, plan, cache: VisionCache, decided: dict, workers: int, log, cuda: bool) -> None:
    """Every rank builds its share of the missing entries; they meet, then check that each sees all of them."""
    from .distributed import rank, world_size

    world, me = world_size(), rank()
    examples = _examples(plan)
    todo = decided["todo"]
    part = shares([_media_tokens(examples[i]) for _, i in todo], world, [decided["done_tokens"]] + [0] * (world - 1))
    outcome = {"failed": "", "built": 0, "written": 0, "bad": {}}
    try:
        _prepass(model, plan, cache.store, [(todo[j][0], examples[todo[j][1]]) for j in part[me]], workers, outcome,
                 decided["done"] if me == 0 else 0)
    except Exception as e:
        if world == 1:
            raise
        outcome["failed"] = f"{type(e).__name__}: {e}"
    outcomes = meet(outcome, cuda)
    for o in outcomes:
        cache.written_bytes += o["written"]
        cache.bad.update(o["bad"])
    line = f"vision feature cache: {cache.hits} entries reused, {cache.misses} computed"
    if world > 1:
        built = [o["built"] + (decided["done"] if r == 0 else 0) for r, o in enumerate(outcomes)]
        line += f" ({' + '.join(map(str, built))} by {world} processes)"
    log(f"{line} ({cache.store.folder})")
    unique = {k for k in cache.train_keys + cache.eval_keys if k}
    if world > 1:
        check_shared(cache.store, unique - set(cache.bad), cuda)
    if cache.written_bytes and me == 0:
        prune(cache_root(), {cache.store.path(k) for k in unique}, limit_bytes(), log)


class _OverLimit(Exception):
    """The run's own features would not fit under $VLMTUNE_VISION_CACHE_GB (nothing was written)."""


def _describe(folder: Path, described: dict) -> None:
    """model.json beside the entries: what the folder's key hashes (for a person looking at the cache)."""
    path = folder / "model.json"
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.json.", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(described, f, indent=1, default=str)
    os.replace(tmp, path)


@contextmanager
def _evaluating(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _encoded(model, plan, items: list, workers: int):
    """(key, entry) for each (key, example) of `items` in order, the entry being the reason the example's media
    failed (a str) where they did; their media decoded by `workers` DataLoader workers."""
    from torch.utils.data import DataLoader

    family = plan.family
    pad = plan.processor.tokenizer.pad_token_id or 0
    rows = to_dataset([e for _, e in items], family, plan.processor, plan.model_config, mark_bad=True)
    loader = DataLoader(rows, batch_size=1, collate_fn=collator_for(family, pad), num_workers=workers)
    device = next(base_model(model).parameters()).device
    for (key, _), batch in zip(items, loader, strict=True):
        if batch.get("bad_samples"):  # counted by the trainer when the row comes up in training
            yield key, batch["bad_samples"][0]["reason"]
        else:
            yield key, encode(model, family, batch, device)


def _measured(model, plan, store: FeatureStore, items: list, cache: VisionCache, reused: int, log) -> int:
    """Build `items` (key, example) up to the first whose media decode, check the cache's size on it (`reused`:
    the bytes of the run's entries already stored count toward the limit) and store it; how many were done."""
    total = sum(_media_tokens(e) for _, e in items)
    done = 0
    with _evaluating(model):
        for (key, entry), (_, example) in zip(_encoded(model, plan, items, 0), items, strict=True):
            done += 1
            if isinstance(entry, str):
                cache.bad[key] = entry
                continue
            _check_size(entry, _media_tokens(example), total, len(items), store.folder, reused, log)
            cache.written_bytes += store.write(key, entry)
            break
    return done


def _prepass(model, plan, store: FeatureStore, items: list, workers: int, outcome: dict, done: int) -> None:
    """Encode and store every (key, example) of `items`, this rank's share; counts into `outcome` (built, written,
    bad). `done`: entries this rank built before (shown in its progress bar)."""
    from tqdm.auto import tqdm

    from .distributed import rank, world_size

    world = world_size()
    desc = "caching vision features" + (f" (rank {rank()} of {world})" if world > 1 else "")
    with _evaluating(model), tqdm(total=len(items) + done, initial=done, desc=desc) as bar:
        for key, entry in _encoded(model, plan, items, workers):
            outcome["built"] += 1
            if isinstance(entry, str):
                outcome["bad"][key] = entry
            else:
                outcome["written"] += store.write(key, entry)
            bar.update()


def _check_size(entry: dict, tokens: int, total_tokens: int, entries: int, folder: Path, reused: int, log) -> float:
    """Print the cache's size (media tokens x bytes per token, measured on the first entry); refuse when the disk
    cannot hold it (DiskFullError) or the run alone needs more than $VLMTUNE_VISION_CACHE_GB (_OverLimit)."""
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(entry))
    per_token = nbytes / max(tokens, 1)
    needed = int(per_token * total_tokens) + 8192 * entries  # a header and a partly filled block per file
    limit = limit_bytes()
    log(f"vision feature cache: {total_tokens:,} media tokens x {per_token:,.0f} bytes = about {human_size(needed)} "
        f"to write under {folder} (the run's features: {human_size(needed + reused)}, limit {limit / 2**30:g} GiB "
        f"${LIMIT_VARIABLE})")
    if needed + reused > limit:
        raise _OverLimit(f"the run's features need about {human_size(needed + reused)}, over the "
                         f"{limit / 2**30:g} GiB of ${LIMIT_VARIABLE}")
    check_space(folder, needed, WHAT, subject="the cached features", advice=ADVICE)
    return per_token


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
