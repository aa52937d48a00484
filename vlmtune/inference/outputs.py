"""Predictions written to --out: streamed to `<out>.partial` batch by batch, the finished file put in place whole."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..errors import VlmtuneError


class PredictionFile:
    """`--out` written as predictions come: each batch is appended to `<out>.partial` at once, and the finished
    file (in input order) replaces `out` at the end. After a crash the partial file keeps what was done; the next
    run to the same `out` moves it aside (`<out>.<time>.partial`) rather than writing over it."""

    def __init__(self, out: Path):
        if out.is_dir():
            raise VlmtuneError(f"--out {out} is a folder; give a file name, e.g. {out / 'predictions.jsonl'}")
        self.out, self.partial, self.done, self.total = out, out.with_name(out.name + ".partial"), 0, 0
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _keep_earlier(self.partial)
            self.file = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish/abandon)
        except OSError as e:
            raise VlmtuneError(f"cannot write --out {out}: {e.strerror or e} ({e.filename or self.partial}); "
                               "choose a file in a folder you can write to") from None

    def add(self, records: list[dict], total: int) -> None:
        self.total = total
        try:
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self.file.flush()
        except OSError as e:
            raise VlmtuneError(f"writing predictions to {self.partial} failed: {e.strerror or e}") from None
        self.done += len(records)

    def finish(self, records: list[dict]) -> None:
        self.file.close()
        write_jsonl(self.out, records)
        self.partial.unlink()

    def abandon(self) -> str:
        """Close the partial file after a failure: what to tell the user ('' when nothing was done)."""
        self.file.close()
        if not self.done:
            self.partial.unlink(missing_ok=True)
            return ""
        return (f"the {self.done} of {self.total} predictions made before this are in {self.partial} "
                "(one JSON record per line, in the order they were made)")


def _keep_earlier(partial: Path) -> None:
    """Move an earlier run's partial predictions aside, named by when they were written, and say where."""
    if not partial.is_file() or partial.stat().st_size == 0:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(partial.stat().st_mtime))
    stem = partial.name.removesuffix(".partial")
    aside, n = partial.with_name(f"{stem}.{stamp}.partial"), 1
    while aside.exists():
        n += 1
        aside = partial.with_name(f"{stem}.{stamp}-{n}.partial")
    os.rename(partial, aside)
    print(f"predict: the predictions an earlier run left in {partial} are kept in {aside}", file=sys.stderr)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
