"""The folders around a merge: the adapter folder checked, --out checked, the output written and moved into place.

The output is written into a hidden temporary folder beside `out` and renamed at the very end, so an
interrupted merge leaves either the old folder or nothing, never a half-made one (a killed merge's hidden
folder is removed by the next merge to the same `out`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..adapter_files import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..disk import check_space, swap_in
from ..errors import VlmtuneError
from ..run_metadata import METADATA_FILE, read_metadata, write_metadata

# adapter-folder files that are not part of the processor (everything else is copied byte for byte)
_NOT_PROCESSOR = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN, "README.md", "train_results.json",
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
    meta = read_metadata(folder)
    if base is None and not meta.get("base_model"):
        raise VlmtuneError(f"{folder / METADATA_FILE} names no base_model; name it with --base")
    return meta


def check_out(out: Path, keep: dict[str, Path], force: bool) -> None:
    """Refuse an --out whose replacement could destroy anything but the output of an earlier merge.

    --out may not be, contain or lie inside a folder of `keep` (description -> folder: the adapter, the base) or
    any folder holding a vlmtune run (vlmtune.json or adapter_config.json in it, a child or a parent);
    --force replaces only a folder a previous merge wrote.
    """
    for what, folder in keep.items():
        check_apart(out, folder, what)
    target = out.resolve()
    for parent in target.parents:
        if holds_run(parent):
            raise VlmtuneError(f"--out {out} lies inside {parent}, which holds a vlmtune run ({holds_run(parent)}); "
                               "choose an --out outside it")
    if target.exists() and not target.is_dir():
        raise VlmtuneError(f"--out {out} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        runs = [child for child in target.iterdir() if child.is_dir() and holds_run(child)]
        if runs:
            raise VlmtuneError(f"--out {out} holds the vlmtune run {runs[0]}; merge-adapter never replaces a "
                               "folder with runs in it, --force or not: choose a new --out")
        if not wrote_by_merge(target):
            what = (f"holds a vlmtune run ({holds_run(target)})" if holds_run(target)
                    else "is not empty and was not written by merge-adapter")
            raise VlmtuneError(f"the output folder {out} {what}; choose a new or empty --out (--force replaces "
                               "only the output of an earlier merge)")
        if not force:
            raise VlmtuneError(f"the output folder {out} holds an earlier merge; choose another or pass --force "
                               "to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)


def check_apart(out: Path, folder: Path, what: str) -> None:
    """Refuse an --out that is, contains or lies inside `folder`."""
    target, folder = out.resolve(), folder.resolve()
    if target == folder:
        raise VlmtuneError(f"--out must not be {what} ({folder}); choose a new folder")
    if target in folder.parents:
        raise VlmtuneError(f"--out {out} contains {what} {folder}, which the merge would replace; choose a new folder")
    if folder in target.parents:
        raise VlmtuneError(f"--out {out} lies inside {what} {folder}; choose a folder outside it")


def holds_run(folder: Path) -> str:
    """The file that marks `folder` as a vlmtune run or adapter ('' when none does)."""
    return next((name for name in (METADATA_FILE, ADAPTER_CONFIG) if (folder / name).is_file()), "")


def wrote_by_merge(folder: Path) -> bool:
    """Whether `folder` is the output of an earlier merge (its vlmtune.json has "merged": write_merged_metadata)."""
    if (folder / ADAPTER_CONFIG).exists():
        return False
    try:
        return "merged" in read_metadata(folder)
    except VlmtuneError:  # unreadable: not known to be a merge's output
        return False


def remove_leftovers(out: Path, log=print) -> None:
    """Remove the hidden folders an interrupted earlier merge to `out` left beside it (and nothing else)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(merging|old)-[a-z0-9_]{{8}}")  # as mkdtemp names them
    for path in sorted(out.parent.iterdir()):
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            log(f"removed {path}, left beside {out} by an interrupted earlier merge")


def check_disk(folder: Path, need: int) -> None:
    """Refuse to start a merge that cannot finish for lack of disk space (2% and 16 MiB to spare)."""
    check_space(folder, int(need * 1.02) + 16 * 2**20, "the merge was not started", subject="the merged model",
                advice="free up space, or choose an --out on a larger disk")


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


def write_merged_metadata(folder: Path, meta: dict, merged: dict) -> None:
    """The adapter's vlmtune.json (family, masking, system prompt: what predict needs) plus how it was merged."""
    write_metadata(folder, {**meta, "merged": merged})


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out` (replacing an old one only once the new one is complete)."""
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp is owner-only
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))  # see remove_leftovers
    try:
        swap_in(tmp, out, old / out.name)
    finally:
        shutil.rmtree(old, ignore_errors=True)
