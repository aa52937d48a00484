"""Prepared data cached on disk, so a second run (validate, inspect, or another rank) skips formatting.

An entry lives in `<VLMTUNE_CACHE>/prepared/<key>/`. The key hashes what decides the examples: the data file's
bytes (a LLaMA-Factory reference: its dataset_info.json and the entry's files), every data.* field that shapes
them, the family, the processor's saved files (tokenizer, chat template, image and video processor configs), the
vlmtune version, the source of the data and family code and the versions of the libraries that tokenize, render
templates and read image and video headers. The media files the rows referenced are checked on load (size,
modification and change time: a copy that keeps the mtime still changes the ctime), since their headers plan the
image tokens. A preference split stores its pairs as chosen, rejected, chosen, ... examples. Token ids are stored
as numpy arrays (loaded without pickle), everything else as JSON. Past
$VLMTUNE_PREPARED_CACHE_GB (default 20) the least recently used entries are removed; a cache that cannot be
written only costs the next run its head start."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .formats import RowProblem
from .preference import PreferencePair, PreparedPairs
from .prepare import Example, PreparedData
from .readers import llamafactory
from .video import VideoClip

FORMAT = 2  # bump when the layout of an entry changes
# data.* fields that do not change the examples: the split's path (its files are hashed instead), loading, the
# mid-run guard, this switch itself, validate's near-duplicate distance. Every other field, a new one included,
# is part of the key.
_UNUSED_FIELDS = frozenset({"train", "eval", "num_workers", "prefetch_factor", "max_bad_samples", "cache",
                            "near_duplicate_distance"})
_PROBLEM_LISTS = ("problems", "dropped", "duplicates", "warnings", "shrinkable")
_COUNTS = ("rows", "shrunk", "decoded", "header_only")
# libraries whose behaviour shapes the examples: tokenization, chat templates, image processors' token counts,
# image and video headers
LIMIT_VARIABLE, DEFAULT_LIMIT_GB = "VLMTUNE_PREPARED_CACHE_GB", 20.0  # past it, least recently used entries go
_LIBRARIES = ("transformers", "tokenizers", "jinja2", "pillow", "av", "numpy")


def cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_CACHE") or Path.home() / ".cache" / "vlmtune") / "prepared"


def cache_key(path: str | Path, data_config, family_name: str, processor, options: dict) -> str:
    """The entry's name: changes when anything that shapes the prepared examples changes.

    `options`: the arguments of `prepare` not in the recipe (check_images, find_shrinkable)."""
    from .. import __version__

    fields = {k: v for k, v in dataclasses.asdict(data_config).items() if k not in _UNUSED_FIELDS}
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps({"format": FORMAT, "version": __version__, "family": family_name, "data": fields,
                         "options": options, "libraries": _library_versions()}, sort_keys=True, default=str).encode())
    h.update(_code_digest().encode())
    h.update(_processor_digest(processor).encode())
    for file in data_files(path):
        _hash_path(h, file)
    return h.hexdigest()


def data_files(path: str | Path) -> list[Path]:
    """The files a data source reads: the file (or folder) itself, or a LLaMA-Factory reference's
    dataset_info.json and its entry's files (an unreadable entry: the info file alone; preparing reports it)."""
    ref = llamafactory.reference(path)
    if ref is None:
        return [Path(path)]
    try:
        files = list(llamafactory.open_entry(path).files)
    except llamafactory.EntryError:
        files = []
    return [ref[0], *files]


def _library_versions() -> dict[str, str | None]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _code_digest() -> str:
    """The source of the data package and the families (readers, formatter, budget, family token layouts)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=20)
    for folder in ("data", "families"):
        for file in sorted((root / folder).rglob("*.py")):
            h.update(str(file.relative_to(root)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def _processor_digest(processor) -> str:
    """The processor as saved (tokenizer files, chat template, processor configs with the recipe's bounds)."""
    h = hashlib.blake2b(digest_size=20)
    with tempfile.TemporaryDirectory(prefix="vlmtune-processor-") as tmp:
        processor.save_pretrained(tmp)
        _hash_path(h, Path(tmp), relative=True)
    return h.hexdigest()


def _hash_path(h, path: Path, relative: bool = False) -> None:
    """A file's bytes, or every file of a folder with its relative name; a missing path hashes its name."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if relative or path.is_dir() else file.resolve()).encode())
        try:
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError:
            h.update(b"<missing>")


def media_stamps(sizes: dict) -> dict[str, list[int] | None]:
    """(size, mtime_ns, ctime_ns) of every image, video and frame file the rows referenced; None for a missing
    one. The ctime changes whenever a file is written or replaced, even by a copy that keeps the mtime."""
    paths: set[str] = set()
    for ref in sizes:
        if isinstance(ref, tuple):  # ("video", a file or a tuple of frame files)
            source = ref[1]
            paths.update(source if isinstance(source, tuple) else [source])
        else:
            paths.add(ref)
    stamps = {}
    for p in sorted(paths):
        try:
            st = os.stat(p)
            stamps[p] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        except OSError:
            stamps[p] = None
    return stamps


def load(key: str) -> PreparedData | None:
    """The entry under `key`, or None when it is missing, unreadable, partial or its media files changed."""
    entry = cache_root() / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        with np.load(entry / "tokens.npz", allow_pickle=False) as z:
            ids, labels, offsets = z["input_ids"], z["labels"], z["offsets"]
        rows = [json.loads(line) for line in (entry / "examples.jsonl").read_text().splitlines()]
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("format") != FORMAT or meta.get("key") != key or len(rows) + 1 != len(offsets):
        return None
    stamps = {p: s for p, s in meta.get("media", {}).items()}
    if media_stamps({p: None for p in stamps}) != stamps:
        return None
    try:
        data = _rebuild(meta, rows, ids, labels, offsets)
    except (KeyError, TypeError, ValueError):
        return None
    try:
        os.utime(entry / "meta.json")  # its last use, for pruning the least recently used entries
    except OSError:
        pass
    return data


def _rebuild(meta: dict, rows: list[dict], ids, labels, offsets) -> PreparedData:
    pairs = bool(meta.get("pairs"))
    out = (PreparedPairs if pairs else PreparedData)(**{k: int(meta[k]) for k in _COUNTS})
    for name in _PROBLEM_LISTS:
        setattr(out, name, [RowProblem(**p) for p in meta[name]])
    examples = []
    for i, r in enumerate(rows):
        a, b = int(offsets[i]), int(offsets[i + 1])
        examples.append(Example(ids[a:b].tolist(), labels[a:b].tolist(), r["images"],
                                    [tuple(g) for g in r["grids"]], r["source"], r["max_pixels"],
                                    [VideoClip.from_json(v) for v in r["videos"]],
                                    [tuple(m) for m in r["media"]]))
    if pairs:  # stored chosen, rejected, chosen, rejected, ...
        out.pairs = [PreferencePair(c, r, c.source) for c, r in zip(examples[::2], examples[1::2], strict=True)]
    else:
        out.examples = examples
    return out


def _flat(data: PreparedData) -> list[Example]:
    """The examples an entry stores: a preference split's pairs as chosen, rejected, chosen, ..."""
    if isinstance(data, PreparedPairs):
        return [e for p in data.pairs for e in (p.chosen, p.rejected)]
    return data.examples


def store(key: str, data: PreparedData, sizes: dict, log: Callable[[str], None] | None = None) -> Path | None:
    """Write the entry atomically (a temp folder renamed into place); an entry already there is kept. `log`: where
    the line saying so goes (default: stderr, beside the progress bars, so that `inspect --json` stays JSON).

    A cache that cannot be written (a full disk, a read-only or missing home) is no error: the run goes on with
    the data it prepared, the line says why nothing was cached, and None is returned."""
    say = log or _to_stderr
    final = cache_root() / key
    try:
        _write(final, key, data, sizes)
        size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    except OSError as e:
        say(f"prepared data not cached in {final.parent}: {e.strerror or e}; the run goes on without the cache "
            "(data.cache: false skips it; $VLMTUNE_CACHE moves it)")
        return None
    say(f"prepared data cached: {final} ({size / 2**20:.1f} MiB)")
    _prune(final, size, say)
    return final


def _prune(kept: Path, kept_size: int, say: Callable[[str], None]) -> None:
    """Remove the least recently used entries while the cache holds more than $VLMTUNE_PREPARED_CACHE_GB
    (default DEFAULT_LIMIT_GB); the entry just written stays."""
    try:
        limit = float(os.environ.get(LIMIT_VARIABLE) or DEFAULT_LIMIT_GB) * 2**30
    except ValueError:
        limit = DEFAULT_LIMIT_GB * 2**30
    entries = []
    for entry in kept.parent.iterdir():
        if entry == kept or entry.name.startswith("."):
            continue
        try:
            used = (entry / "meta.json").stat().st_mtime
            entries.append((used, sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()), entry))
        except OSError:
            continue
    total = kept_size + sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda e: e[0]):  # least recently used first
        if total <= limit:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        say(f"prepared data cache over {limit / 2**30:g} GiB ({LIMIT_VARIABLE}): removed {entry.name}")


def _write(final: Path, key: str, data: PreparedData, sizes: dict) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    try:
        examples = _flat(data)
        lengths = [len(e.input_ids) for e in examples]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        flat = [t for e in examples for t in e.input_ids]
        flat_labels = [t for e in examples for t in e.labels]
        dtype = np.int32 if max(flat, default=0) < 2**31 else np.int64  # half the bytes for any real vocabulary
        np.savez(tmp / "tokens.npz", input_ids=np.asarray(flat, dtype=dtype),
                 labels=np.asarray(flat_labels, dtype=dtype), offsets=offsets)
        with (tmp / "examples.jsonl").open("w") as f:
            for e in examples:
                f.write(json.dumps({"images": e.images, "grids": [list(g) for g in e.grids], "source": e.source,
                                    "max_pixels": e.max_pixels, "videos": [v.to_json() for v in e.videos],
                                    "media": [list(m) for m in e.media]}) + "\n")
        meta = {"format": FORMAT, "key": key, "media": media_stamps(sizes), "pairs": isinstance(data, PreparedPairs),
                **{k: getattr(data, k) for k in _COUNTS},
                **{name: [dataclasses.asdict(p) for p in getattr(data, name)] for name in _PROBLEM_LISTS}}
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: an entry without it is ignored
        tmp.chmod(0o755)
        if final.exists():  # a stale or broken entry under the same key: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process published the same entry meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)
