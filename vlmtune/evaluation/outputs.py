"""`eval --out DIR`: predictions.jsonl and summary.json, each written whole (temporary file, then rename).

DIR must be new, empty, or an earlier eval's folder named again with overwrite; eval never writes into a
folder that holds anything else, and replaces no file but its own two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import VlmtuneError

PREDICTIONS, SUMMARY = "predictions.jsonl", "summary.json"
MARK = "vlmtune_eval"  # the key in summary.json that says an eval wrote the folder


def check_out(out: Path, overwrite: bool) -> None:
    """Before any work: refuse an --out that is a file, another tool's folder, or an earlier eval without overwrite."""
    if out.exists() and not out.is_dir():
        raise VlmtuneError(f"--out {out} is a file; eval writes a folder (predictions.jsonl, summary.json)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not _written_by_eval(out):
        raise VlmtuneError(f"--out {out} already holds files that eval did not write; choose a new or empty folder")
    if not overwrite:
        raise VlmtuneError(f"--out {out} holds an earlier evaluation; choose another folder, or add --overwrite "
                           "(overwrite=True) to replace its predictions.jsonl and summary.json")


def _written_by_eval(out: Path) -> bool:
    try:
        return MARK in json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def write_outputs(out: Path, records: list[dict], summary: dict) -> None:
    """Predictions first, the summary (which marks the folder as eval's) last."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic(out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        _atomic(out / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise VlmtuneError(f"cannot write --out {out}: {e.strerror or e} ({e.filename or out})") from None


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
