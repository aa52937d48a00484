"""Data files -> Conversation, with every problem reported by file and row (never raised for one bad row).

`data.format` names the row layout (a reader in `readers/`); the container is chosen by the path
(JSONL, JSON array, Parquet, or a `datasets` folder: see `readers/sources.py`). `data.columns` maps
the layout's field names to other column / key names, e.g. `{image: img, question: q, answer: a}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .conversation import Conversation
from .images import ImageResolver
from .readers import (
    alpaca,
    caption,
    llamafactory,
    llava,
    messages,
    preference,
    preference_plain,
    prompt_completion,
    sharegpt,
    sources,
    vqa,
)
from .readers.common import DEFAULT_CAPTION_PROMPT, Options, Row, RowError, Unused

READERS = {"messages": messages, "llava": llava, "sharegpt": sharegpt, "vqa": vqa, "caption": caption,
           "prompt_completion": prompt_completion, "alpaca": alpaca}
FORMATS = tuple(READERS)
# preference layouts: each row is a ConversationPair (a prompt and two replies), prepared by data/preference.py
PAIR_READERS = {"preference": preference, "preference_plain": preference_plain}
PAIR_FORMATS = tuple(PAIR_READERS)
FIELDS = {name: (*r.REQUIRED, *r.OPTIONAL) for name, r in {**READERS, **PAIR_READERS}.items()}  # data.columns may map

__all__ = ["FORMATS", "FIELDS", "PAIR_FORMATS", "RowError", "RowProblem", "read_rows", "reader_options"]


@dataclass(frozen=True)
class RowProblem:
    file: str
    row: int  # 1-based: the line of a JSONL file, the item of a JSON array, the row of a table
    message: str
    unreadable: bool = False  # the container refused it (bad JSON, a missing column...), not the row layout

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.message}"


def reader_options(data) -> dict:
    """The keyword arguments of `read_rows` that come from a recipe's `data` section."""
    return {"caption_prompt": getattr(data, "caption_prompt", DEFAULT_CAPTION_PROMPT),
            "columns": getattr(data, "columns", None) or {}, "allow_urls": getattr(data, "allow_urls", False),
            "max_row_bytes": getattr(data, "max_row_bytes", sources.DEFAULT_MAX_ROW_BYTES)}


def read_rows(path: str | Path, fmt: str, image_root: str | None = None, *,
              caption_prompt: str = DEFAULT_CAPTION_PROMPT, columns: dict[str, str] | None = None,
              allow_urls: bool = False, max_row_bytes: int = sources.DEFAULT_MAX_ROW_BYTES,
              warn: Callable[[RowProblem], None] | None = None) -> Iterator[Conversation | RowProblem]:
    """Each row of a data source as a Conversation (a ConversationPair for PAIR_FORMATS; images as local path
    strings), or a RowProblem.

    `warn` receives, once per file, each column (message key, part key) that the layout does not read."""
    if fmt not in FIELDS:
        raise ValueError(f"unknown data format {fmt!r}; supported: {', '.join(FIELDS)}")
    options = Options(caption_prompt=caption_prompt)
    if llamafactory.reference(path) is not None:  # dir/dataset_info.json#name: the entry gives layout and columns
        yield from _entry_rows(path, image_root, allow_urls, options, max_row_bytes, warn)
        return
    reader, path = {**READERS, **PAIR_READERS}[fmt], Path(path)
    columns = dict(columns or {})
    wanted = {columns.get(f, f): f for f in reader.REQUIRED} | {src: f for f, src in columns.items()}
    resolve = ImageResolver(sources.base_dir(path), image_root, allow_urls)
    unused = Unused({*FIELDS[fmt], *columns.values()}, f"format {fmt}",
                    f"its fields are {', '.join(FIELDS[fmt])} (data.columns maps a column of yours to one)")
    yield from _file_rows(path, sources.rows(path, wanted, max_row_bytes), lambda raw: _mapped(raw, columns),
                          lambda row: reader.read(row, resolve, options), unused, warn)


def _entry_rows(ref, image_root: str | None, allow_urls: bool, options: Options, max_row_bytes: int,
                warn: Callable[[RowProblem], None] | None) -> Iterator[Conversation | RowProblem]:
    """A LLaMA-Factory dataset: every file of its dataset_info.json entry, read as the entry says (data.format and
    data.columns are for plain files). The entry names the columns it reads; as in LLaMA-Factory the others are
    ignored, and `warn` is told which."""
    try:
        entry = llamafactory.open_entry(ref)
    except llamafactory.EntryError as e:
        yield RowProblem(str(ref), 1, str(e), unreadable=True)
        return
    resolve = ImageResolver(entry.media_dir, image_root, allow_urls)
    for path in entry.files:
        yield from _file_rows(path, sources.rows(path, entry.wanted, max_row_bytes), entry.row,
                              lambda row: entry.read(row, resolve, options), entry.unused(), warn)


def _file_rows(path: Path, numbered: Iterator[sources.Numbered], to_row: Callable[[object], Row],
               read: Callable[[Row], Conversation], unused: Unused | None,
               warn: Callable[[RowProblem], None] | None) -> Iterator[Conversation | RowProblem]:
    for number, unit, raw in numbered:
        where = f"{unit} {number}: " if unit else ""
        row = problem = None
        try:
            if isinstance(raw, RowError):
                raise raw
            row = to_row(raw)
            conv = read(row)
        except RowError as e:
            problem = RowProblem(str(path), number, where + str(e), unreadable=isinstance(raw, RowError))
        if warn is not None and unused is not None and row is not None and (note := unused.new(raw, row)):
            warn(RowProblem(str(path), number, where + note))
        if problem is not None:
            yield problem
            continue
        conv.source = f"{path}:{number}"
        yield conv


def _mapped(raw: object, columns: dict[str, str]) -> Row:
    """The row with its fields under the layout's names (`data.columns`: field -> column)."""
    if not isinstance(raw, dict):
        raise RowError(f"expected a JSON object, got {type(raw).__name__}: {raw!r}"[:200])
    row = Row(raw)
    row.names = columns
    for field, column in columns.items():
        if column not in raw:
            raise RowError(f'missing column "{column}" (data.columns.{field})')
        row[field] = raw[column]
    return row
