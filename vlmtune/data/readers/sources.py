"""Raw rows out of a data source, numbered for error messages; the container is chosen by the path.

- a folder: a Hugging Face `datasets` dataset saved with `save_to_disk` (rows numbered "row N", 1-based)
- `*.parquet`: a Parquet file ("row N", 1-based)
- a file starting with `[`: one JSON array of objects ("item N", 1-based index in the array)
- anything else: JSONL, one object per line (the line number)

Table rows come out as Python dicts straight from Arrow, so image columns stay `{"bytes", "path"}`
dicts and are never decoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .common import RowError

BATCH_ROWS = 1024
Numbered = tuple[int, str, object]  # (row number, unit: "" for a line, "item" or "row"), row dict or RowError


def rows(path: Path, columns: dict[str, str]) -> Iterator[Numbered]:
    """Every row of `path`. `columns` (source column -> field it feeds) must exist in a table's schema."""
    if path.is_dir():
        return _dataset_rows(path, columns)
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path, columns)
    if _starts_with(path, "["):
        return _json_array_rows(path)
    return _jsonl_rows(path)


def base_dir(path: Path) -> Path:
    """Where relative image paths of a source resolve (without data.image_root)."""
    return path if path.is_dir() else path.parent


def _starts_with(path: Path, char: str) -> bool:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == char
    return False


def _jsonl_rows(path: Path) -> Iterator[Numbered]:
    with open(path, "rb") as f:  # bytes, so that one badly encoded line is that line's problem only
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, "", RowError(f"not UTF-8 text (byte {e.start} of the line); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield line_no, "", json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, "", RowError(f"not valid JSON ({e.msg} at column {e.colno}); "
                                            "each line must be one JSON object")


def _json_array_rows(path: Path) -> Iterator[Numbered]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            items = json.load(f)
    except UnicodeDecodeError as e:
        yield 1, "", RowError(f"not UTF-8 text (byte {e.start} of the file); save the file as UTF-8")
        return
    except json.JSONDecodeError as e:
        yield e.lineno, "", RowError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); a file "
                                     "starting with [ must be one JSON array of row objects")
        return
    for n, item in enumerate(items, start=1):
        yield n, "item", item


def _parquet_rows(path: Path, columns: dict[str, str]) -> Iterator[Numbered]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        yield 1, "row", RowError(f"cannot be read as Parquet ({e.__class__.__name__}: {e})")
        return
    yield from _table_rows(table.schema_arrow.names, table.iter_batches(batch_size=BATCH_ROWS), columns, "Parquet file")


def _dataset_rows(path: Path, columns: dict[str, str]) -> Iterator[Numbered]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a folder that is not a dataset
        yield 1, "row", RowError(f"is not a dataset saved with datasets' save_to_disk ({e.__class__.__name__}: {e})")
        return
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(f"{path / name}" for name in ds)
        yield 1, "row", RowError(f"holds several splits; point data.train / data.eval at one of: {splits}")
        return
    batches = ds.with_format("arrow").iter(batch_size=BATCH_ROWS)
    yield from _table_rows(ds.column_names, batches, columns, "dataset")


def _table_rows(names: list[str], batches, columns: dict[str, str], what: str) -> Iterator[Numbered]:
    missing = [(source, field) for source, field in columns.items() if source not in names]
    if missing:
        source, field = missing[0]
        hint = f"map it with data.columns, e.g. columns: {{{field}: <column>}}" if source == field \
            else f"fix data.columns.{field}"
        yield 1, "row", RowError(f'column "{source}" (for "{field}") is not in the {what}, so no row can be read; '
                                 f"its columns are: {', '.join(names)}; {hint}")
        return
    n = 0
    for batch in batches:
        for item in batch.to_pylist():
            n += 1
            yield n, "row", item
