"""Disk space: check it before a write, name a full disk when a write fails on one, and swap a finished
folder into place."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import VlmtuneError

# what torch's zip writer (inline_container.cc) and safetensors say when the disk fills during a write
_FULL_DISK_WORDS = ("no space left", "file write failed", "storagefull", "os error 28")
RUN_ADVICE = "free up space, lower train.save_total_limit, or choose an output_dir on a larger disk"


class DiskFullError(VlmtuneError):
    """Not enough free space for a write: names the folder, the bytes needed and the bytes free."""


def human_size(n: float) -> str:
    """Decimal units, as disk sizes and `--shard-size 5GB` are given."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.2f} {unit}"


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


def shortage(folder: Path, needed: int, subject: str = "the write", advice: str = RUN_ADVICE) -> str | None:
    """The message for a write of `needed` bytes into `folder` that would not fit, else None."""
    free = free_bytes(folder)
    if free >= needed:
        return None
    return (f"not enough disk space in {folder}: {subject} needs about {human_size(needed)}, {human_size(free)} "
            f"are free; {advice}")


def check_space(folder: Path, needed: int, what: str, subject: str = "the write", advice: str = RUN_ADVICE) -> None:
    problem = shortage(folder, needed, subject, advice)
    if problem:
        raise DiskFullError(f"{what}: {problem}")


def is_full_disk(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return any(word in str(error).lower() for word in _FULL_DISK_WORDS)


@contextmanager
def full_disk_as_error(folder: Path, needed: int, what: str, cleanup: Callable[[], None]) -> Iterator[None]:
    """Run a write; if it fails, `cleanup()` the partial result; a full disk is raised as DiskFullError naming
    it, any other error as it was (a permission error or a bug is never reported as a full disk)."""
    try:
        yield
    except Exception as e:  # torch, safetensors and tokenizers each raise their own type for a full disk
        cleanup()
        if not is_full_disk(e):
            raise
        free = free_bytes(folder)
        raise DiskFullError(f"{what}: the disk filled up while writing {folder} (needed about {human_size(needed)}, "
                            f"{human_size(free)} free now); the partial files were removed; {RUN_ADVICE}") from e


def swap_in(new: Path, target: Path, aside: Path) -> None:
    """Put the folder `new` at `target`, replacing what is there only once `new` is whole: two renames, no copy.

    The old `target` is renamed to `aside` first and removed last; a kill between the renames leaves it there
    (each caller knows its `aside` and recovers from it); a failed second rename puts it back."""
    if not target.exists():
        os.replace(new, target)
        return
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
