"""Tiny random models per family, saved as real local model folders and cached as builtin models."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .. import families

# builtin name (tiny-qwen2-vl) -> family name, from the family registry
BUILTIN_MODELS = {f.tiny_name: f.name for f in families.all_families() if f.build_tiny}
_BUILD_VERSION = 1
_MARKER = "vlmtune-builtin.json"


# A 0.02-std random output layer caps logits near zero, so LoRA alone could barely lower the loss;
# pretrained models have large output rows, which this scale imitates.
_OUTPUT_INIT_STD = 0.15


def _widen_output_logits(model) -> None:
    import torch

    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            layer.weight.normal_(0.0, _OUTPUT_INIT_STD)


def build_tiny_model_dir(out_dir: str | os.PathLike, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write a tiny randomly initialised model + processor folder that loads with from_pretrained offline."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    spec = families.get(family)
    if spec.build_tiny is None:
        raise ValueError(f"family {family!r} has no tiny test model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, model_cls, proc = spec.build_tiny()
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    _widen_output_logits(model)
    t = proc.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=t.bos_token_id if t.bos_token_id is not None else t.pad_token_id,
        eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
    )  # fmt: skip
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # saving may import DeepSpeed, whose logger prints to stdout: keep stdout for the command's output
        # (`inspect --json` on a first run)
        with contextlib.redirect_stdout(sys.stderr):
            model.save_pretrained(out)
            proc.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_CACHE") or Path.home() / ".cache" / "vlmtune")


def _is_current(path: Path, family: str) -> bool:
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("family") == family and meta.get("build") == _build_id(family)


def _build_id(family: str) -> str:
    """Changes whenever the code that builds this family's tiny model changes, so cached builtin models never go
    stale: the demo package, the Family record and the family's own module."""
    digest = hashlib.sha256()
    module = sys.modules[families.get(family).build_tiny.__module__].__file__
    for path in [*sorted(Path(__file__).parent.glob("*.py")), Path(families.__file__).parent / "base.py",
                 Path(module)]:
        digest.update(path.read_bytes())
    return f"{_BUILD_VERSION}-{digest.hexdigest()[:16]}"


def builtin_model_path(name: str) -> Path:
    """Path of a builtin tiny model (see BUILTIN_MODELS), building it under the cache on first use."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    family = BUILTIN_MODELS[name]
    final = _cache_root() / "builtin" / name
    if _is_current(final, family):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        build_tiny_model_dir(tmp, family=family, seed=0)
        (tmp / _MARKER).write_text(json.dumps({"name": name, "family": family, "build": _build_id(family)}))
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp and safetensors default to owner-only
        if final.exists() and not _is_current(final, family):
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=final.parent))
            with contextlib.suppress(FileNotFoundError):  # a concurrent build may have moved it already
                os.replace(final, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_current(final, family):  # lost a race to a concurrent build: theirs is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
