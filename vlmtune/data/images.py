"""All image I/O: resolving references, reading sizes from headers, decoding."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageProblem(ValueError):
    pass


def resolve(ref: str, data_file: Path, image_root: str | os.PathLike | None) -> Path:
    """A data file's image reference as a path: relative ones against `image_root`, else the data file's folder."""
    if not isinstance(ref, str) or not ref:
        raise ImageProblem(f"image reference must be a non-empty string path, got {ref!r}")
    if ref.startswith(("http://", "https://")):
        raise ImageProblem(f"image {ref!r} is a URL; download the images and refer to local paths")
    path = Path(ref).expanduser()
    if not path.is_absolute():
        base = Path(image_root) if image_root else data_file.parent
        path = base / path
    return path


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ImageProblem(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageProblem(f"image cannot be read: {path} ({e.__class__.__name__}: {e})") from None


def load_rgb(path: str | Path) -> Image.Image:
    """The decoded image in RGB."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageProblem(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageProblem(f"image cannot be decoded: {path} ({e.__class__.__name__}: {e})") from None
