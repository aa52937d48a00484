"""The frozen-vision feature cache (`train.cache_vision_features`): whether a run uses it, and its storage.

When neither the vision tower nor the projector trains, what they make of an example's images is the same on
every pass: a pre-pass (vision_cache_prepass.py) runs them once per example and stores the outputs the model
feeds on (`Family.image_feature_outputs`), which later steps pass as `mm_encoder_outputs` instead of pixels.

Storage: `<VLMTUNE_CACHE>/vision/<model key>/<xx>/<entry key>.safetensors`, one file per example, memory-mapped
when read. The model key hashes the weights' file names, sizes and modification times, the family, dtype,
device, attention kernel, quantization and the processor's saved files (pixel bounds included); an entry's key
hashes the bytes of its media files, its grids, its own pixel bound and its video frames. Each file is written
whole and renamed into place, so a killed pre-pass leaves only whole entries (the next run computes the rest);
an entry that fails to open is rebuilt. Past $VLMTUNE_VISION_CACHE_GB (default 50) the least recently used
entries, of any model, are removed after a pre-pass wrote new ones; a run's own entries always stay. With several
processes each builds a share of the missing entries (vision_cache_ranks.py), so every node must see the same
$VLMTUNE_CACHE: a run whose ranks do not is refused after the pre-pass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .data import prepared_cache
from .data.collator import EncoderOutput
from .data.packing import pack_bins
from .disk import human_size
from .errors import FieldError, VlmtuneError

FORMAT = 1  # bump when an entry's layout changes
FIELD = "train.cache_vision_features"
LIMIT_VARIABLE, DEFAULT_LIMIT_GB = "VLMTUNE_VISION_CACHE_GB", 50.0


def setting(recipe) -> str:
    """auto, true or false (a Recipe built in code may hold a Python bool)."""
    value = recipe.train.cache_vision_features
    return {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else str(value)


def unsupported(recipe, family, zero_stage: int, world_size: int) -> str:
    """Why the recipe cannot use the cache ("" when it can), from the recipe alone."""
    lo = recipe.lora
    if lo.train_vision_tower or lo.train_projector:
        which = "lora.train_vision_tower" if lo.train_vision_tower else "lora.train_projector"
        return f"{which} is true: the vision side trains, so its outputs change every step"
    prefixes = (family.vision_prefix, *family.projector_prefixes)
    for name in lo.modules_to_save or ():
        if any(p == name or p.endswith("." + name) or name.startswith(p + ".") for p in prefixes):
            return f"lora.modules_to_save trains {name}, part of the vision side"
    if zero_stage == 3:
        return "ZeRO-3 partitions the vision tower, which every rank then runs in every step"
    return ""  # several processes (DDP, ZeRO-1/2): each builds a share of the cache, every rank reads it all


def problems(recipe, family, zero_stage: int, world_size: int) -> list[FieldError]:
    """train.cache_vision_features: true where the run cannot use it."""
    if setting(recipe) != "true":
        return []
    why = unsupported(recipe, family, zero_stage, world_size)
    return [FieldError(FIELD, f"cannot be true here: {why}; set it to auto or false")] if why else []


def passes(plan) -> float:
    """How many times the training run sees its data (fractional where max_steps ends mid-epoch)."""
    t = plan.recipe.train
    if t.max_steps <= 0:
        return float(t.num_train_epochs)
    examples = plan.train.examples
    items = len(examples)
    if t.packing:
        items = len(pack_bins([len(e.input_ids) for e in examples], plan.recipe.data.max_length, t.seed))
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * plan.world_size
    return t.max_steps * per_step / max(items, 1)


def decide(plan, report: dict[str, tuple[int, int]]) -> tuple[bool, str]:
    """(on, why) for a loaded model whose trainable parameters per component are `report` (trainable_report)."""
    choice = setting(plan.recipe)
    if choice == "false":
        return False, f"{FIELD} is false"
    why = unsupported(plan.recipe, plan.family, plan.zero_stage, plan.world_size)
    trained = [c for c in ("vision", "projector") if report.get(c, (0, 0))[0]]
    if not why and trained:
        why = f"the {' and '.join(trained)} parameters train"
    if why:
        if choice == "true":
            raise VlmtuneError(f"{FIELD}: cannot be true here: {why}; set it to auto or false")
        return False, why
    examples = list(plan.train.examples) + list(plan.eval.examples if plan.eval else [])
    if not any(e.images or e.videos for e in examples):
        return False, "the data has no images or videos"
    seen = passes(plan)
    if choice == "true":
        return True, f"{FIELD} is true"
    if seen <= 1:
        return False, (f"the run sees its data {seen:.2g} time(s): nothing to reuse (set {FIELD}: true to build "
                       "the cache for later runs)")
    return True, f"the vision side is frozen and the run sees its data {seen:.3g} times"


# ---------------------------------------------------------------- keys
def cache_root() -> Path:
    return prepared_cache.cache_root().parent / "vision"


def limit_bytes() -> float:
    """$VLMTUNE_VISION_CACHE_GB in bytes (GiB; the default where it is unset or not a number)."""
    try:
        return float(os.environ.get(LIMIT_VARIABLE) or DEFAULT_LIMIT_GB) * 2**30
    except ValueError:
        return DEFAULT_LIMIT_GB * 2**30


def prune(root: Path, kept: set[Path], limit: float, log) -> int:
    """Remove the least recently used entries (by modification time: a run touches what it reads) under `root`,
    of every model, while they hold more than `limit` bytes; `kept` (the current run's) stay. A model folder left
    without entries goes too. Returns the bytes removed."""
    entries = []
    for path in root.glob("*/??/*.safetensors"):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = 0
    for _, size, path in sorted(entries, key=lambda e: e[0]):  # least recently used first
        if total <= limit:
            break
        if path in kept:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed += size
    if removed:
        in_use = {p.parent.parent for p in kept}
        for folder in root.iterdir():
            if folder.is_dir() and folder not in in_use and not any(folder.glob("??/*.safetensors")):
                shutil.rmtree(folder, ignore_errors=True)
        log(f"vision feature cache over {limit / 2**30:g} GiB (${LIMIT_VARIABLE}): removed {human_size(removed)} "
            f"of least recently used features ({human_size(total)} left)")
    return removed


def model_key(plan) -> tuple[str, dict]:
    """The folder name of a model's features, and what it hashes (written beside them as model.json)."""
    import transformers

    from . import __version__
    from .modeling import pixel_bounds

    r, rt = plan.recipe, plan.runtime
    path = Path(plan.model_path)
    files = ([[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
              for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [])
    described = {"format": FORMAT, "vlmtune": __version__, "transformers": transformers.__version__,
                 "model": str(plan.model_path), "revision": r.model.revision, "files": files,
                 "family": plan.family.name, "dtype": str(rt.dtype), "device": rt.device,
                 "attention": rt.attn_implementation, "quantization": dataclasses.asdict(r.quantization),
                 "pixel_bounds": pixel_bounds(plan.processor, plan.family),
                 "processor": prepared_cache._processor_digest(plan.processor)}
    digest = hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=16)
    return digest.hexdigest(), described


class MediaHasher:
    """Entry keys from media contents. A file's digest is remembered by (size, mtime, ctime) in `index` (a JSON
    file beside the caches), so a later run reads only the files that changed; the ctime catches a rewrite that
    restored the mtime (cp -p, rsync -t)."""

    def __init__(self, index: Path | None = None):
        self.index = index
        self._known: dict[str, list] = {}
        if index is not None:
            try:
                self._known = json.loads(index.read_text())
            except (OSError, ValueError):
                self._known = {}
        self._changed = False

    def file(self, path: str) -> str:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        known = self._known.get(path)
        if known and known[:3] == stamp and len(known) == 4:
            return known[3]
        h = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self._known[path] = [*stamp, h.hexdigest()]
        self._changed = True
        return h.hexdigest()

    def save(self) -> None:
        """Write the digests (whole, renamed into place) when any was computed."""
        if self.index is None or not self._changed:
            return
        self.index.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.index.name}.", dir=self.index.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self._known, f)
        os.replace(tmp, self.index)
        self._changed = False

    def key(self, example) -> str | None:
        """The entry key of an example's media; None for a text-only example."""
        if not example.images and not example.videos:
            return None
        videos = []
        for clip in example.videos:
            sources = clip.source if isinstance(clip.source, tuple) else (clip.source,)
            videos.append({**clip.to_json(), "source": [self.file(s) for s in sources]})
        spec = {"images": [self.file(p) for p in example.images], "grids": [list(g) for g in example.grids],
                "max_pixels": example.max_pixels, "videos": videos}
        return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=20).hexdigest()


# ---------------------------------------------------------------- entries
def _flatten(value, name: str, tensors: dict) -> dict:
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().to("cpu").contiguous().clone()  # a split's views share storage
        return {"t": name}
    if isinstance(value, (list, tuple)):
        return {"l": [_flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    raise TypeError(f"vision cache: cannot store a {type(value).__name__} ({name})")


def _unflatten(spec: dict, get):
    if "t" in spec:
        return get(spec["t"])
    items = [_unflatten(s, get) for s in spec["l"]]
    return tuple(items) if spec["tuple"] else items


class FeatureStore:
    """One model's cached features: entries by key. Reading needs only the folder (DataLoader workers)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def touch(self, key: str) -> int:
        """Mark an entry used now (for pruning the least recently used); its size, 0 when it is gone."""
        path = self.path(key)
        try:
            os.utime(path)
            return path.stat().st_size
        except OSError:
            return 0

    def valid(self, key: str) -> bool:
        """The entry opens and has this format's layout (a file cut short or overwritten does not)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                meta = f.metadata() or {}
                json.loads(meta["spec"])
                return meta.get("format") == str(FORMAT)
        except Exception:  # safetensors raises its own error types for a damaged file
            return False

    def write(self, key: str, entry: dict) -> int:
        """Store an entry ({"outputs": {kind: {name: value}}, "inputs": {key: tensor}}) whole; its bytes."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        spec = {"outputs": {kind: {n: _flatten(v, f"o.{kind}.{n}", tensors) for n, v in outs.items()}
                            for kind, outs in entry["outputs"].items()},
                "inputs": {k: _flatten(v, f"i.{k}", tensors) for k, v in entry["inputs"].items()}}
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"format": str(FORMAT), "spec": json.dumps(spec)})
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def read(self, key: str) -> dict | None:
        """The entry with its outputs as EncoderOutput per kind; None when it is missing or unreadable."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                spec = json.loads(f.metadata()["spec"])
                outputs = {kind: EncoderOutput({n: _unflatten(s, f.get_tensor) for n, s in outs.items()})
                           for kind, outs in spec["outputs"].items()}
                inputs = {k: _unflatten(s, f.get_tensor) for k, s in spec["inputs"].items()}
        except Exception:  # a damaged file: the row becomes a bad sample (the pre-pass rebuilds it next run)
            return None
        return {"outputs": outputs, "inputs": inputs}
