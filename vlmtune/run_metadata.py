"""vlmtune.json, the one reader and writer: training writes it last, merge writes its copy, predict and merge read it.

A folder that holds it is a finished run (run_folder), so it is written atomically: to a hidden temporary name
in the same folder, then renamed over the old one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import VlmtuneError

METADATA_FILE = "vlmtune.json"  # written last: a folder that holds it is a finished run

_FIX = ("training writes it at the end of a run: copy it again from the run's folder, or delete it and name the base "
        "model with --base (and, for predict --data, the data format with --format)")


def read_metadata(folder: str | Path) -> dict:
    """The run's vlmtune.json in `folder` ({} when it has none); VlmtuneError naming the file when it is unreadable
    or not a JSON object."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise VlmtuneError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise VlmtuneError(f"{path} is not valid JSON ({e}); {_FIX}") from None
    if not isinstance(meta, dict):
        raise VlmtuneError(f"{path} holds no JSON object (a training run writes one); {_FIX}")
    return meta


def listed_files(folder: Path) -> list[str] | None:
    """The names the run in `folder` wrote, as its vlmtune.json lists them (None: no readable list)."""
    try:
        files = read_metadata(folder).get("files")
    except VlmtuneError:
        return None
    return files if isinstance(files, list) else None


def write_metadata(folder: Path, meta: dict) -> None:
    """Write `meta` as `folder`/vlmtune.json, whole or not at all."""
    tmp = Path(folder) / f".{METADATA_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, Path(folder) / METADATA_FILE)
    except BaseException:  # a full disk, Ctrl-C: the earlier file stays as it was, and no temporary file
        tmp.unlink(missing_ok=True)
        raise


def remove_metadata(folder: Path) -> None:
    """Mark `folder` as no longer a finished run (until write_metadata writes it again)."""
    (Path(folder) / METADATA_FILE).unlink(missing_ok=True)
