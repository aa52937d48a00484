"""Disk space: check it before a write, and name a full disk when a write fails on one."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import VlmtuneError

# what torch's zip writer (inline_container.cc) and safetensors say when the disk fills during a write
_FULL_DISK_WORDS = ("no space left", "file write failed", "storagefull", "os error 28")


class DiskFullError(VlmtuneError):
    """Not enough free space for a write: names the folder, the bytes needed and the bytes free."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest parent that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def shortage(folder: Path, needed: int) -> str | None:
    """The message for a write of `needed` bytes into `folder` that would not fit, else None."""
    free = free_bytes(folder)
    if free >= needed:
        return None
    return (f"not enough free disk space in {folder}: the write needs about {human(needed)}, {human(free)} is free; "
            "free up space, lower train.save_total_limit, or choose an output_dir on a larger disk")


def check_space(folder: Path, needed: int, what: str) -> None:
    problem = shortage(folder, needed)
    if problem:
        raise DiskFullError(f"{what}: {problem}")


def is_full_disk(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return any(word in str(error).lower() for word in _FULL_DISK_WORDS)


@contextmanager
def full_disk_as_error(folder: Path, needed: int, what: str, cleanup: Callable[[], None]) -> Iterator[None]:
    """Run a write; if the disk fills, `cleanup()` the partial result and raise DiskFullError naming it."""
    try:
        yield
    except Exception as e:  # torch, safetensors and tokenizers each raise their own type; others re-raised
        if not (is_full_disk(e) or free_bytes(folder) < needed):  # torch's zip writer words it many ways
            raise
        cleanup()
        free = free_bytes(folder)
        raise DiskFullError(f"{what}: the disk filled up while writing {folder} (needed about {human(needed)}, "
                            f"{human(free)} free now); the partial files were removed. Free up space, lower "
                            "train.save_total_limit, or choose an output_dir on a larger disk") from None
