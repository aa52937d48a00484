"""The images an index holds: every image file under a folder, or every image a data file's rows name."""

from __future__ import annotations

from pathlib import Path

from ..errors import VlmtuneError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_paths(source, fmt: str = "caption", image_root: str | None = None) -> list[str]:
    """Absolute image paths, in a stable order: a folder's image files sorted by path (recursively), or a data
    file's images in row order, each once."""
    path = Path(source)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        found = sorted(str(p.absolute()) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise VlmtuneError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    if not path.exists():
        raise VlmtuneError(f"--images {path}: no such folder or data file")
    return _data_file_images(path, fmt, image_root)


def _data_file_images(path: Path, fmt: str, image_root: str | None) -> list[str]:
    from ..data.formats import RowProblem, read_rows
    from ..evaluation.rows import REPLY_FIELD, read_eval_rows

    seen: dict[str, None] = {}
    if fmt in REPLY_FIELD:  # caption / vqa rows may list several references: read as eval reads them
        rows = read_eval_rows(path, fmt, {}, image_root).rows
        return list(dict.fromkeys(str(Path(img).absolute()) for r in rows for t in r.prompt.turns for img in t.images))
    problems = []
    for item in read_rows(path, fmt, image_root):
        if isinstance(item, RowProblem):
            problems.append(str(item))
            continue
        seen.update(dict.fromkeys(str(Path(img).absolute()) for img in item.images))
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        raise VlmtuneError(f"{len(problems)} row(s) of {path} cannot be read as format {fmt} (give the data's "
                           f"layout with --format):\n{shown}")
    if not seen:
        raise VlmtuneError(f"no row of {path} names an image")
    return list(seen)
