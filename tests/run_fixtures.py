"""Helpers for the output-folder and checkpoint tests: a small recipe, a copy of a finished run, file snapshots."""

from __future__ import annotations

import shutil
from pathlib import Path

import vlmtune

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data_templates" / "shapes"


def write_train_data(folder: Path, rows: int = 8) -> Path:
    """The first `rows` shapes rows (images under SHAPES)."""
    path = folder / "train.jsonl"
    path.write_text("\n".join((SHAPES / "train.jsonl").read_text().splitlines()[:rows]) + "\n")
    return path


def recipe_at(out: Path, data: Path, **overrides):
    """Two steps of 4 rows on the tiny Qwen2-VL, a checkpoint after each."""
    fields = {"model.name_or_path": "builtin:tiny-qwen2-vl", "data.train": str(data),
              "data.image_root": str(SHAPES), "output_dir": str(out), "train.max_steps": 2,
              "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
              "train.learning_rate": 1e-2, "train.logging_steps": 1, "train.save_steps": 1,
              "train.gradient_checkpointing": False, "data.num_workers": 0, "lora.dropout": 0.0}
    fields.update(overrides)
    return vlmtune.load_recipe(None, overrides=fields)


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes: equal snapshots mean nothing was replaced, added or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def quiet(*args, **kwargs) -> None:
    pass


def recipe_file(tmp_path: Path, data: Path, **train) -> Path:
    """A recipe YAML (absolute paths) for the CLI; `train` fields on top of one step of the tiny model."""
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-qwen2-vl"},
        "data": {"train": str(data), "image_root": str(SHAPES), "num_workers": 0},
        "lora": {"dropout": 0.0},
        "train": {"max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                  "learning_rate": 1e-2, "gradient_checkpointing": False, **train}}))
    return path


def can_mount_tmpfs(where: Path) -> bool:
    """Whether this machine lets a process mount a private tmpfs (a user namespace: `unshare -rm`)."""
    import subprocess

    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{where}'"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0
