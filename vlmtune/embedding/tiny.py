"""Tiny random embedding models, saved as real model folders and cached as builtin models (builtin:tiny-clip)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import registry

BUILTIN_PREFIX = "builtin:"


def build_tiny_dir(out_dir: str | os.PathLike, family: str = "clip", seed: int = 0) -> Path:
    """Write a tiny randomly initialised model + processor folder of `family` that loads offline."""
    import torch

    spec = registry.get(family)
    if spec.build_tiny is None:
        raise ValueError(f"embedding family {family!r} has no tiny test model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, model_cls, processor = spec.build_tiny()
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if spec.init_tiny is not None:
        spec.init_tiny(model)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for a command's own output
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def _build_id(family: str) -> str:
    """Changes whenever the code building this family's tiny model changes (a cached copy never goes stale)."""
    digest = hashlib.sha256()
    module = sys.modules[registry.get(family).build_tiny.__module__].__file__
    for path in sorted({Path(__file__), Path(registry.__file__), Path(module), Path(__file__).with_name("tiny_tokenizer.py")}):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def builtin_path(name: str) -> Path:
    """The folder of builtin tiny model `name` (tiny-clip, tiny-siglip), built under $VLMTUNE_CACHE on first use."""
    family = registry.by_tiny_name(name).name
    root = Path(os.environ.get("VLMTUNE_CACHE") or Path.home() / ".cache" / "vlmtune") / "builtin"
    final = root / f"{name}-{_build_id(family)}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build_tiny_dir(tmp, family)
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        with contextlib.suppress(OSError):  # a concurrent build that finished first is as good
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(name_or_path: str) -> str:
    """A builtin tiny model's folder, else the id or path unchanged."""
    if str(name_or_path).startswith(BUILTIN_PREFIX):
        return str(builtin_path(str(name_or_path)[len(BUILTIN_PREFIX):]))
    return str(name_or_path)
