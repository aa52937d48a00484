"""A data file written again without some of its rows, in the input's own container (JSONL, JSON array,
Parquet, a saved `datasets` folder), row numbers as the readers count them. Kept rows are copied as they are
(a JSONL line byte for byte, a JSON item as its text). Written whole beside the target, then renamed into place;
never over the input, and over an existing file only when asked."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..data.readers import llamafactory, sources
from ..errors import VlmtuneError


def _refuse_target(source: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and source.exists() and os.path.samefile(source, out):
        raise VlmtuneError(f"{out} is the input data file itself; write the cleaned rows to a new file and point "
                           "the recipe's data path at it (the input is never replaced)")
    if out.exists() and not overwrite:
        raise VlmtuneError(f"{out} already exists; choose another file for the cleaned rows, or add --overwrite "
                           "(write_clean(..., overwrite=True)) to replace it")
    if source.suffix.lower() == ".parquet" and out.suffix.lower() != ".parquet":
        raise VlmtuneError(f"{out}: the input {source} is Parquet, so the cleaned file is too; name it *.parquet "
                           "(the readers choose the container by that suffix)")
    if source.is_dir() and out.exists() and not out.is_dir():
        raise VlmtuneError(f"{out} is a file, but the input {source} is a saved datasets folder; name a folder")


def _replace(tmp: Path, out: Path) -> None:
    if tmp.is_dir() and out.is_dir():  # a folder cannot be renamed over a non-empty one: move the old aside first
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_clean(source: str | os.PathLike, drop: set[int], out: str | os.PathLike, overwrite: bool = False) -> int:
    """Write `source` without the rows numbered in `drop` (1-based, as the readers number them) to `out`;
    returns how many rows were left out."""
    source, out = Path(source), Path(out)
    if llamafactory.reference(source) is not None:
        raise VlmtuneError(f"{source} is a LLaMA-Factory dataset_info.json entry, which may span several files; "
                           "point the recipe at one data file to clean it")
    _refuse_target(source, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        return _write_dataset(source, drop, out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if source.suffix.lower() == ".parquet":
            dropped = _write_parquet(source, drop, Path(tmp))
        elif sources._starts_with(source, "["):
            dropped = _write_json_array(source, drop, Path(tmp))
        else:
            dropped = _write_jsonl(source, drop, Path(tmp))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dropped


def _write_jsonl(source: Path, drop: set[int], tmp: Path) -> int:
    dropped = 0
    with open(source, "rb") as f, open(tmp, "wb") as w:
        for number, line in enumerate(f, start=1):
            if number in drop:
                dropped += 1
            else:
                w.write(line)
    return dropped


def _write_json_array(source: Path, drop: set[int], tmp: Path) -> int:
    text = source.read_text(encoding="utf-8-sig")
    spans = [(start, end) for start, end, _ in sources._array_items(text)]
    items = [text[start:end] for n, (start, end) in enumerate(spans, start=1) if n not in drop]
    tmp.write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    return len(spans) - len(items)


def _write_parquet(source: Path, drop: set[int], tmp: Path) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[[n - 1 for n in drop if 0 < n <= table.num_rows]] = False
    pq.write_table(table.filter(keep), tmp)
    return int((~keep).sum())


def _write_dataset(source: Path, drop: set[int], out: Path) -> int:
    import datasets

    ds = datasets.load_from_disk(str(source))
    keep = [i for i in range(len(ds)) if i + 1 not in drop]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ds.select(keep).save_to_disk(str(tmp))
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(ds) - len(keep)
