"""tests/ds_worker.py with two probes of the vision cache's pre-pass (tests/test_distributed_vision_cache.py).

    python tests/vision_cache_worker.py sft recipe.yaml distributed.num_processes=2 ...

Probe options (environment), read in each process the launcher starts:
- VLMTUNE_PROBE_CACHE_PER_RANK=<folder>: each rank its own $VLMTUNE_CACHE, <folder>/rank<N> (the tiny models
  still shared), as on nodes that each have their own disk;
- VLMTUNE_PROBE_FAIL_WRITE_RANK=<N>: rank N's writes of vision cache entries fail as on a full disk.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path


def install(rank: str) -> None:
    base = os.environ.get("VLMTUNE_PROBE_CACHE_PER_RANK")
    if base:
        shared = Path(os.environ["VLMTUNE_CACHE"])
        mine = Path(base) / f"rank{rank}"
        mine.mkdir(parents=True, exist_ok=True)
        if (shared / "builtin").is_dir() and not (mine / "builtin").exists():
            (mine / "builtin").symlink_to((shared / "builtin").resolve(), target_is_directory=True)
        os.environ["VLMTUNE_CACHE"] = str(mine)
    if os.environ.get("VLMTUNE_PROBE_FAIL_WRITE_RANK") == rank:
        from vlmtune.vision_cache import FeatureStore

        def full(self, key, entry):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path(key)))

        FeatureStore.write = full


def main() -> int:
    import ds_worker

    from vlmtune import distributed

    if distributed.under_launcher():
        install(os.environ.get("RANK", "0"))
    return ds_worker.main()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
