"""Raw rows out of a data source, numbered for error messages; the container is chosen by the path.

- a folder: a Hugging Face `datasets` dataset saved with `save_to_disk` (rows numbered "row N", 1-based)
- `*.parquet`: a Parquet file ("row N", 1-based)
- a file starting with `[`: one JSON array of objects ("item N", 1-based index in the array)
- anything else: JSONL, one object per line (the line number)

Table rows come out as Python dicts straight from Arrow, so image columns stay `{"bytes", "path"}`
dicts and are never decoded.

A row larger than `max_row_bytes` (data.max_row_bytes) is a RowError before it is parsed where the container
allows: a JSONL line is measured as it is read (never held whole), a JSON item on its text (an item longer than
the limit is skipped by a scan of its brackets and strings, never decoded), a table row on its values (strings and
bytes, embedded images included).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from .common import RowError

BATCH_ROWS = 1024
DEFAULT_MAX_ROW_BYTES = 16 * 2**20  # data.max_row_bytes
Numbered = tuple[int, str, object]  # (row number, unit: "" for a line, "item" or "row"), row dict or RowError


def rows(path: Path, columns: dict[str, str], max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Numbered]:
    """Every row of `path`. `columns` (source column -> field it feeds) must exist in a table's schema."""
    if path.is_dir():
        return _dataset_rows(path, columns, max_row_bytes)
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path, columns, max_row_bytes)
    if _starts_with(path, "["):
        return _json_array_rows(path, max_row_bytes)
    return _jsonl_rows(path, max_row_bytes)


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


def _too_big(what: str, size: int, limit: int) -> RowError:
    return RowError(f"{what} is {size:,} bytes, over data.max_row_bytes={limit:,}; shorten it (e.g. refer to "
                    "images by path rather than embedding them) or raise data.max_row_bytes")


def _jsonl_rows(path: Path, limit: int) -> Iterator[Numbered]:
    with open(path, "rb") as f:  # bytes, so that one badly encoded line is that line's problem only
        for line_no, raw, size in _lines(f, limit):
            if raw is None:
                yield line_no, "", _too_big("line", size, limit)
                continue
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


def _lines(f, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, the line, its size without the newline); the line is None when it is over `limit`
    bytes, and then only `limit` bytes of it were ever held at once."""
    line_no = 0
    while raw := f.readline(limit + 1):
        line_no += 1
        size = len(raw) - raw.endswith(b"\n")
        if size <= limit:
            yield line_no, raw, size
            continue
        while not raw.endswith(b"\n") and (raw := f.readline(limit + 1)):
            size += len(raw) - raw.endswith(b"\n")
        yield line_no, None, size


def _json_array_rows(path: Path, limit: int) -> Iterator[Numbered]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        yield 1, "", RowError(f"not UTF-8 text (byte {e.start} of the file); save the file as UTF-8")
        return
    try:
        items = list(_array_items(text, limit))  # a broken array is one problem, as json.load would raise
    except json.JSONDecodeError as e:
        yield e.lineno, "", RowError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); a file "
                                     "starting with [ must be one JSON array of row objects")
        return
    for n, (start, end, item) in enumerate(items, start=1):
        size = _utf8_size(text, start, end, limit)
        yield n, "item", _too_big("item", size, limit) if size > limit else item


def _utf8_size(text: str, start: int, end: int, limit: int) -> int:
    """The UTF-8 bytes of text[start:end] (encoded a slice at a time), or its characters where even 4 bytes each
    would not pass `limit`."""
    if (end - start) * 4 <= limit:
        return end - start
    return sum(len(text[at:min(end, at + 2**20)].encode()) for at in range(start, end, 2**20))


_SPACE = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_TO_BRACKET = re.compile(r'[^"\[\]{}]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"\[\]{}]*)*', re.S)  # strings skipped whole
_SCALAR = re.compile(r"[^,\]\s]*")
TOO_LONG = object()  # an array item longer than the limit, left undecoded


def _long_item_end(text: str, pos: int, limit: int) -> int | None:
    """Where the JSON value at `pos` ends when it is longer than `limit` characters; None when it is shorter, or
    not well-formed (the decoder then reads it, or says what is wrong)."""
    if text.startswith('"', pos) or not text.startswith(("[", "{"), pos):
        found = (_STRING if text.startswith('"', pos) else _SCALAR).match(text, pos)
        return found.end() if found and found.end() - pos > limit else None
    depth, at = 0, pos
    while True:  # one step per bracket: text and strings between them are skipped by the regex
        at = _TO_BRACKET.match(text, at).end()
        if at >= len(text) or text[at] == '"':  # the array or a string never closes
            return None
        depth += 1 if text[at] in "[{" else -1
        at += 1
        if depth == 0:
            return at if at - pos > limit else None


def _array_items(text: str, limit: int | None = None) -> Iterator[tuple[int, int, object]]:
    """(start, end, value) of each item of the JSON array `text`, one at a time; JSONDecodeError as json.loads.

    An item longer than `limit` characters (so over `limit` bytes) is not decoded: its value is TOO_LONG."""
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise json.JSONDecodeError("Expecting '['", text, pos)
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            long = limit is not None and len(text) - pos > limit  # else what is left is too short to be too long
            end = _long_item_end(text, pos, limit) if long else None
            item, end = (TOO_LONG, end) if end is not None else decoder.raw_decode(text, pos)
            yield pos, end, item
            pos = _SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    if _SPACE.match(text, pos).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, _SPACE.match(text, pos).end())


def _parquet_rows(path: Path, columns: dict[str, str], limit: int) -> Iterator[Numbered]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        yield 1, "row", RowError(f"cannot be read as Parquet ({e.__class__.__name__}: {e})")
        return
    yield from _table_rows(table.schema_arrow.names, table.iter_batches(batch_size=BATCH_ROWS), columns,
                           "Parquet file", limit)


def _dataset_rows(path: Path, columns: dict[str, str], limit: int) -> Iterator[Numbered]:
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
    yield from _table_rows(ds.column_names, batches, columns, "dataset", limit)


def _table_rows(names: list[str], batches, columns: dict[str, str], what: str, limit: int) -> Iterator[Numbered]:
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
            size = _value_bytes(item)
            yield n, "row", _too_big("row", size, limit) if size > limit else item


def _value_bytes(value: object) -> int:
    """The bytes of a table row's strings and binary values (numbers and nulls: 8)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(_value_bytes(k) + _value_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 8
