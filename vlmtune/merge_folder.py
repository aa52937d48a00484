"""The folders around a merge: the adapter folder checked, the output folder written and moved into place.

The output is written into a hidden temporary folder beside `out` and renamed at the very end, so an
interrupted merge leaves either the old folder or nothing, never a half-made one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import VlmtuneError
from .merge_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .training import METADATA_FILE

# adapter-folder files that are not part of the processor (everything else is copied byte for byte)
_NOT_PROCESSOR = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin", "README.md", "train_results.json",
                  METADATA_FILE, "trainer_state.json", "training_args.bin", "config.json", "generation_config.json"}


def check_adapter_folder(folder: Path, base: str | None) -> dict:
    """The adapter folder's vlmtune.json, after checking every file the merge needs is there."""
    if not folder.is_dir():
        raise VlmtuneError(f"adapter folder not found: {folder}")
    need = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer_config.json"]
    if base is None:
        need.append(METADATA_FILE)
    missing = [n for n in need if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        missing.append("processor_config.json (or preprocessor_config.json)")
    if missing:
        hint = (f"; without {METADATA_FILE} name the base model with --base" if missing == [METADATA_FILE]
                else "; a complete vlmtune training run writes them all")
        raise VlmtuneError(f"the adapter folder {folder} lacks {', '.join(missing)}{hint}")
    meta = json.loads((folder / METADATA_FILE).read_text()) if (folder / METADATA_FILE).is_file() else {}
    if base is None and not meta.get("base_model"):
        raise VlmtuneError(f"{folder / METADATA_FILE} names no base_model; name it with --base")
    return meta


def check_out(out: Path, adapter_dir: Path, force: bool) -> None:
    """Refuse an output folder that holds anything, unless forced."""
    if out.resolve() == adapter_dir.resolve():
        raise VlmtuneError("--out must not be the adapter folder")
    if out.exists() and not out.is_dir():
        raise VlmtuneError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise VlmtuneError(f"the output folder {out} is not empty; choose another or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def human_size(n: float) -> str:
    """Decimal units, as disk sizes and `--shard-size 5GB` are given."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.2f} {unit}"


def check_disk(folder: Path, need: int) -> None:
    """Refuse to start a merge that cannot finish for lack of disk space."""
    free = shutil.disk_usage(folder).free
    if free < need * 1.02 + 16 * 2**20:
        raise VlmtuneError(f"not enough disk space in {folder}: the merged model needs about {human_size(need)}, "
                           f"{human_size(free)} are free")


def write_config(folder: Path, base_dir: Path, dtype, untie: bool) -> None:
    """The base's config.json (dtype and weight tying updated) and generation_config.json."""
    config = json.loads((base_dir / "config.json").read_text())
    subs = [v for v in config.values() if isinstance(v, dict) and "model_type" in v]
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config["dtype"] = name
        for c in subs:
            for key in ("dtype", "torch_dtype"):
                if key in c:
                    c[key] = name
    if untie:
        config["tie_word_embeddings"] = False
        for c in subs:
            if "tie_word_embeddings" in c:
                c["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", folder / "generation_config.json")


def copy_processor(adapter_dir: Path, folder: Path) -> None:
    """Processor, tokenizer and chat template files exactly as training saved them (pixel bounds included)."""
    for path in adapter_dir.iterdir():
        if path.name.startswith(".") or path.name in _NOT_PROCESSOR or path.suffix in (".safetensors", ".bin"):
            continue
        if path.is_file():
            shutil.copy2(path, folder / path.name)
        elif path.is_dir() and path.name == "additional_chat_templates":
            shutil.copytree(path, folder / path.name)


def write_metadata(folder: Path, meta: dict, merged: dict) -> None:
    """The adapter's vlmtune.json (family, masking, system prompt: what predict needs) plus how it was merged."""
    (folder / METADATA_FILE).write_text(json.dumps({**meta, "merged": merged}, indent=2) + "\n", encoding="utf-8")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out` (replacing an old one only once the new one is complete)."""
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp is owner-only
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old / out.name, out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
