"""The one rule for paths in a recipe: relative to the recipe file's folder, or to the working directory for
overrides (data_templates/README.md, "Paths")."""

from __future__ import annotations

import os
from pathlib import Path

PATH_FIELDS = ("model.name_or_path", "data.train", "data.eval", "data.image_root", "train.resume_from_checkpoint",
               "distributed.deepspeed", "distributed.hostfile", "output_dir", "dpo.init_adapter")


def paths_resolved(key: str, value, base: Path):
    """`value` as set at dotted `key`, with every path field in it made absolute against `base`.

    The one rule: a relative path in a recipe file is relative to that file's folder, one given as an override
    is relative to the working directory (data_templates/README.md, "Paths").
    """
    if isinstance(value, dict):
        return {k: paths_resolved(f"{key}.{k}" if key else str(k), v, base) for k, v in value.items()}
    if key not in PATH_FIELDS or not isinstance(value, str) or not value:
        return value
    if key == "distributed.deepspeed" and not value.endswith(".json"):
        return value  # none or a preset name
    if key == "train.resume_from_checkpoint" and value == "latest":
        return value
    if key == "model.name_or_path" and not (value in (".", "..") or value.startswith(("./", "../", "~", "/"))
                                            or (base / value).exists()):
        return value  # a Hugging Face id (org/name) or builtin:NAME
    return os.path.abspath(base / os.path.expanduser(value))
