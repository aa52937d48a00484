"""LLaMA-Factory datasets by name: `data.train: path/dataset_info.json#name` reads that entry's file (or every file
of its folder, in name order) with the entry's "formatting", "columns" and "tags", as LLaMA-Factory reads them.

- "formatting": "alpaca" (the default) is read by `alpaca`, "sharegpt" by `sharegpt`: the entry's columns name the
  reader's fields, and its tags turn each message into `{"role", "content"}` with the roles user, assistant, system.
- As in LLaMA-Factory, a "columns" (or "tags") object replaces the defaults as a whole: what it does not name is
  not read.
- "file_name" and relative media paths resolve against the folder of dataset_info.json (LLaMA-Factory's
  dataset_dir and media_dir); media paths against `data.image_root` instead when that is set.
- What vlmtune cannot read as LLaMA-Factory means it (Hub entries, preference data, sampling, tool calls) is
  refused with the reason.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..conversation import Conversation
from . import alpaca, sharegpt
from .common import IMAGE_TAG, VIDEO_TAG, Options, Resolve, Row, RowError, Unused

INFO_NAME = "dataset_info.json"
READERS = {"alpaca": alpaca, "sharegpt": sharegpt}
DEFAULT_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
                   "sharegpt": {"messages": "conversations"}}
FIELDS = {  # LLaMA-Factory column -> the field of our reader it feeds, per formatting
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history"},
    "sharegpt": {"messages": "messages"},
}
SHARED_COLUMNS = ("system", "tools", "images", "videos", "audios")  # same name in both formattings and our readers
PREFERENCE_COLUMNS = ("chosen", "rejected", "kto_tag")
REQUIRED_COLUMNS = {"alpaca": ("prompt", "response"), "sharegpt": ("messages",)}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
TOOL_TAGS = ("observation_tag", "function_tag")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
IGNORED_KEYS = ("subset", "folder", "revision", "file_sha1")  # used by LLaMA-Factory for Hub entries only
KEYS = ("file_name", *HUB_KEYS, "formatting", "ranking", "split", "num_samples", "columns", "tags", *IGNORED_KEYS)
SUFFIXES = (".json", ".jsonl", ".parquet")


class EntryError(ValueError):
    """Why a dataset_info.json entry cannot be read at all: every reason found, each one a user can act on."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def reference(value: object) -> tuple[Path, str] | None:
    """(dataset_info.json, dataset name) when `value` names a LLaMA-Factory dataset, else None (a plain path).

    `dir/dataset_info.json` without `#name` is a reference too, with an empty name, so that it is refused as one."""
    text = str(value)
    head, sep, name = text.rpartition("#")
    if sep and head.lower().endswith(".json") and not Path(text).exists():
        return Path(head), name
    return (Path(text), "") if not sep and Path(text).name == INFO_NAME else None


def problems(value: object) -> list[str]:
    """What stops `open_entry` from reading this reference (empty when it can be read)."""
    try:
        open_entry(value)
    except EntryError as e:
        return e.problems
    return []


def setting_problems(splits: list[str], fmt: str, columns: dict | None) -> list[tuple[str, str]]:
    """(recipe field, problem) for data.format / data.columns set although every split is an entry, which brings
    its own layout and columns (they apply to the plain files only)."""
    refs = [s for s in splits if s]
    if not refs or any(reference(s) is None for s in refs):
        return []
    out = []
    if columns:
        out.append(("data.columns", 'does not apply to a dataset_info.json entry (its "columns" say which column is '
                                    "which): remove data.columns, or edit the entry"))
    try:
        formattings = sorted({open_entry(s).formatting for s in refs})
    except EntryError:
        return out  # reported for the split itself
    if fmt not in ("messages", *formattings):
        out.append(("data.format", f"is {fmt}, but the data is LLaMA-Factory {' and '.join(formattings)} data, "
                                   "whose entry gives the layout: leave data.format out"))
    return out


@dataclass(frozen=True)
class Entry:
    """One dataset_info.json entry, ready to read row by row."""

    name: str
    formatting: str  # alpaca | sharegpt: also the name of the reader
    files: tuple[Path, ...]
    media_dir: Path
    columns: dict[str, str] = field(default_factory=dict)  # reader field -> column
    tags: dict[str, str | None] = field(default_factory=dict)

    @property
    def wanted(self) -> dict[str, str]:
        """The columns every row has (column -> field), which a table's schema must hold."""
        required = {FIELDS[self.formatting][c] for c in REQUIRED_COLUMNS[self.formatting]}
        return {column: f for f, column in self.columns.items() if f in required}

    def row(self, raw: object) -> Row:
        """The raw row's columns under the reader's field names; a column the row lacks is null, as in LF."""
        if not isinstance(raw, dict):
            raise RowError(f"expected a JSON object, got {type(raw).__name__}: {raw!r}"[:200])
        row = Row({f: raw.get(c) for f, c in self.columns.items()})
        row.names = {f: c for f, c in self.columns.items() if f != c}
        return row

    def unused(self) -> Unused:
        """The record of columns (and message keys) the entry leaves unread, for one file's warnings."""
        roles = {f: r for r, f in {**FIELDS[self.formatting], **{c: c for c in SHARED_COLUMNS}}.items()}
        named = ", ".join(f'"{roles.get(f, f)}": "{c}"' for f, c in self.columns.items())
        return Unused(self.columns.values(), f'the {INFO_NAME} entry "{self.name}"',
                      f'the entry reads only the columns its "columns" names ({named}): to read another, name it '
                      f'there under its LLaMA-Factory role, e.g. "images": "<column>"')

    def read(self, row: Row, resolve: Resolve, options: Options) -> Conversation:
        try:
            if self.formatting == "alpaca":
                return alpaca.read(row, resolve, options)
            return self._read_sharegpt(row, resolve, options)
        except RowError as e:
            raise RowError(f"{e}{self._media_hint(str(e))}") from None

    def _media_hint(self, message: str) -> str:
        """Where a media tag found nothing to take and the entry reads no media column of that kind: say so."""
        for media, tag in (("images", IMAGE_TAG), ("videos", VIDEO_TAG)):
            if media not in self.columns and tag in message:
                return (f'; the entry\'s "columns" in {INFO_NAME} names no "{media}" column, so no {media} are read: '
                        f'add "{media}": "<the column holding them>"')
        return ""

    def _read_sharegpt(self, row: Row, resolve: Resolve, options: Options) -> Conversation:
        msgs = self._messages(row)
        if msgs and msgs[0]["role"] == "system":  # LLaMA-Factory: a first system message wins over the column
            row.pop("system", None)
        rewritten = Row({**row, "messages": msgs})
        rewritten.names = row.names
        try:
            return sharegpt.read(rewritten, resolve, options)
        finally:
            row.unused.update(rewritten.unused)  # message keys nothing reads

    def _messages(self, row: Row) -> list[dict]:
        """The row's messages with the entry's tags turned into role / content and our role names."""
        value = row.get("messages")
        if value is None:
            raise RowError(f"missing {row.label('messages')}")
        if not isinstance(value, list):
            raise RowError(f"{row.label('messages')} must be a list of messages, got {value!r}"[:300])
        tags = self.tags
        role_key, content_key = tags["role_tag"], tags["content_tag"]
        roles = {tags[t]: role for t, role in ROLE_TAGS.items() if tags.get(t) is not None}
        tools = {tags[t]: t for t in TOOL_TAGS if tags.get(t) is not None}
        out = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict):
                raise RowError(f"message {i}: expected an object, got {msg!r}"[:300])
            role = msg.get(role_key)
            if isinstance(role, str) and role in tools:
                raise RowError(f'message {i}: "{role_key}": {role!r} is the entry\'s {tools[role]} (a tool call or '
                               "its result); vlmtune does not train tool use, so the row cannot be read")
            if not isinstance(role, str) or role not in roles:
                known = ", ".join(f'{t} "{tags[t]}"' for t in ROLE_TAGS if tags.get(t) is not None)
                hint = f'; add "system_tag": "{role}" to the entry\'s "tags"' if role == "system" else ""
                raise RowError(f'message {i}: "{role_key}": {role!r} is none of the entry\'s roles ({known}){hint}'
                               [:300])
            if content_key not in msg:
                raise RowError(f'message {i}: no "{content_key}" (the entry\'s content_tag)')
            rest = {k: v for k, v in msg.items() if k not in (role_key, content_key, "from", "value", "role", "content")}
            out.append({**rest, "role": roles[role], "content": msg[content_key]})
        return out


def open_entry(value: object) -> Entry:
    """The entry `value` (`dir/dataset_info.json#name`) names, or EntryError listing why it cannot be read."""
    ref = reference(value)
    if ref is None:
        raise EntryError([f"{value} is not a dataset_info.json#name reference"])
    info, name = ref
    raw = _entry_of(info, name)
    found = [f'entry "{name}": unknown key "{k}"{_close(k, KEYS)}' for k in raw if k not in KEYS]
    formatting = raw.get("formatting", "alpaca")
    if not isinstance(formatting, str) or formatting not in READERS:
        hint = ('; its rows are OpenAI-style messages: point data.train at the file itself with data.format: messages'
                if formatting == "openai" else "")
        raise EntryError([*found, f'entry "{name}": "formatting" must be alpaca or sharegpt, got {formatting!r}{hint}'])
    found += _unsupported(raw, name)
    by_field = _columns(raw, name, formatting, found)
    tags = _tags(raw, name, formatting, found)
    files = _files(info, raw, name, found)
    if found:
        raise EntryError(found)
    return Entry(name, formatting, tuple(files), info.parent, by_field, tags)


def _entry_of(info: Path, name: str) -> dict:
    if not info.is_file():
        raise EntryError([f"file not found: {info}"])
    try:
        entries = json.loads(info.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise EntryError([f"{info} is not UTF-8 text (byte {e.start})"]) from None
    except json.JSONDecodeError as e:
        raise EntryError([f"{info} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"]) from None
    if not isinstance(entries, dict):
        raise EntryError([f"{info} must be one JSON object of datasets by name, as LLaMA-Factory's data/{INFO_NAME}"])
    names = [str(n) for n in entries]
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    if not name:
        raise EntryError([f"name the dataset: {info}#<name>, one of: {shown}"])
    if name not in entries:
        raise EntryError([f'no dataset "{name}" in {info}{_close(name, names)} (it lists: {shown})'])
    if not isinstance(entries[name], dict):
        raise EntryError([f'entry "{name}" of {info} must be an object, got {entries[name]!r}'[:300]])
    return entries[name]


def _unsupported(raw: dict, name: str) -> list[str]:
    out = []
    if raw.get("ranking"):
        out.append(f'entry "{name}": "ranking": true marks preference pairs (chosen / rejected), which supervised '
                   "fine-tuning does not train on")
    if raw.get("num_samples") is not None:
        out.append(f'entry "{name}": "num_samples" (LLaMA-Factory draws that many rows at random) is not supported: '
                   "vlmtune reads every row; remove it, or cut the file")
    if raw.get("split", "train") != "train":
        out.append(f'entry "{name}": "split": {raw["split"]!r} applies to Hub datasets; a local file is read whole '
                   '(remove "split")')
    return out


def _columns(raw: dict, name: str, formatting: str, found: list[str]) -> dict[str, str]:
    """Reader field -> column, from the entry's "columns" (or LLaMA-Factory's defaults when it has none)."""
    given = raw.get("columns", DEFAULT_COLUMNS[formatting])
    if not isinstance(given, dict) or not all(isinstance(v, str) or v is None for v in given.values()):
        found.append(f'entry "{name}": "columns" must map column roles to column names, got {given!r}'[:300])
        return {}
    fields = {**FIELDS[formatting], **{c: c for c in SHARED_COLUMNS}}
    reads = (*READERS[formatting].REQUIRED, *READERS[formatting].OPTIONAL)
    other = "sharegpt" if formatting == "alpaca" else "alpaca"
    known = (*FIELDS["alpaca"], *FIELDS["sharegpt"], *SHARED_COLUMNS, *PREFERENCE_COLUMNS)
    out = {}
    for role, column in given.items():
        if column is None:
            continue
        where = f'entry "{name}": "columns.{role}"'
        if role in PREFERENCE_COLUMNS:
            found.append(f"{where} marks preference or KTO data, which supervised fine-tuning does not train on")
        elif role in FIELDS[other]:
            found.append(f'{where} applies to {other} data; this entry is {formatting}'
                         + (' (the default): add "formatting": "sharegpt"' if formatting == "alpaca" else ""))
        elif role not in fields:
            found.append(f"{where} is not a LLaMA-Factory column{_close(role, known)}")
        elif fields[role] not in reads:
            found.append(f"{where}: vlmtune does not read {role} in {formatting} rows (it reads: "
                         f"{', '.join(r for r in fields if fields[r] in reads)}); remove it")
        else:
            out[fields[role]] = column
    for role in REQUIRED_COLUMNS[formatting]:
        if given.get(role) is None:
            found.append(f'entry "{name}": "columns" names no "{role}" column; LLaMA-Factory reads only the columns '
                         f'a "columns" object names, so add "{role}": "{DEFAULT_COLUMNS[formatting].get(role, role)}"'
                         + (" (an entry without a reply is pretraining text, which this does not train on)"
                            if role == "response" else ""))
    return out


def _tags(raw: dict, name: str, formatting: str, found: list[str]) -> dict[str, str | None]:
    """The sharegpt tags: the entry's "tags" (what it leaves out is unset, as in LLaMA-Factory), or the defaults."""
    if "tags" not in raw:
        return dict(DEFAULT_TAGS)
    given = raw["tags"]
    if formatting != "sharegpt":
        found.append(f'entry "{name}": "tags" apply to sharegpt data; this entry is {formatting} (the default): '
                     'add "formatting": "sharegpt"')
        return {}
    if not isinstance(given, dict) or not all(isinstance(v, str) or v is None for v in given.values()):
        found.append(f'entry "{name}": "tags" must map tag names to strings, got {given!r}'[:300])
        return {}
    found += [f'entry "{name}": "tags.{k}" is not a LLaMA-Factory tag{_close(k, DEFAULT_TAGS)}'
              for k in given if k not in DEFAULT_TAGS]
    tags = {t: given.get(t) for t in DEFAULT_TAGS}
    found += [f'entry "{name}": "tags" names no "{t}"; LLaMA-Factory uses only the tags a "tags" object names, so add '
              f'"{t}": "{DEFAULT_TAGS[t]}" (or the name your data uses)' for t in ("role_tag", "content_tag",
                                                                                  "user_tag", "assistant_tag")
              if tags[t] is None]
    return tags


def _files(info: Path, raw: dict, name: str, found: list[str]) -> list[Path]:
    """The data files of the entry: its file_name, or every file of the folder it names."""
    file_name = raw.get("file_name")
    if file_name is None:
        hub = next((k for k in HUB_KEYS if raw.get(k)), None)
        found.append(f'entry "{name}" is on a hub ({hub}: {raw[hub]}) and vlmtune reads local files only: download '
                     'it and add "file_name" to the entry, or point data.train at the downloaded files' if hub else
                     f'entry "{name}" names no "file_name"')
        return []
    if not isinstance(file_name, str) or not file_name:
        found.append(f'entry "{name}": "file_name" must be a path, got {file_name!r}')
        return []
    path = info.parent / file_name
    if path.is_dir():
        files = sorted(path.iterdir())
        if not files:
            found.append(f'entry "{name}": the folder {path} ("file_name") holds no files')
    elif path.is_file():
        files = [path]
    else:
        found.append(f'entry "{name}": "file_name" {file_name!r} not found (looked for {path})')
        return []
    for p in files:
        if not p.is_file() or p.suffix.lower() not in SUFFIXES:
            found.append(f'entry "{name}": {p} is not a {", ".join(SUFFIXES)} file, which is what vlmtune reads; '
                         "convert it (e.g. with datasets: Dataset.from_csv(...).to_json(...)) or move it out of "
                         "the folder")
    return files


def _close(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""
