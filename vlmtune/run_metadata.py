"""vlmtune.json: the one reader (training writes it last, merge copies it; predict and merge read it here)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VlmtuneError
from .run_folder import METADATA_FILE


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


_FIX = ("training writes it at the end of a run: copy it again from the run's folder, or delete it and name the base "
        "model with --base (and, for predict --data, the data format with --format)")
