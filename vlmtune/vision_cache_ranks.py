"""The vision feature cache's pre-pass split across the processes of a run, and their meeting after it.

Rank 0 decides which entries are missing (vision_cache_prepass.py); `shares` gives each rank a part of them,
balanced by media tokens; every rank builds its part, then `meet` gathers what each did (or the error it hit,
raised on every rank as one VlmtuneError) and `check_shared` makes sure every rank sees every entry: ranks on
nodes with their own disks (an unshared $VLMTUNE_CACHE) would find the others' entries missing."""

from __future__ import annotations

import os
import socket
import sys
import time

from .errors import VlmtuneError
from .main_decides import gathered
from .vision_cache import FIELD

SETTLE_S = 10.0  # how long a rank looks again for entries another node wrote (a network filesystem's caches lag)


def shares(tokens: list[int], world: int, preload: list[int] | None = None) -> list[list[int]]:
    """The indices of `tokens` (media tokens per entry) each rank builds: the largest first, each to the rank with
    the least tokens so far (`preload`: what ranks already hold), the lower rank on a tie; each share in order."""
    loads = list(preload) if preload else [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += tokens[i]
    return [sorted(p) for p in parts]


def where() -> str:
    """This process as an error names it: rank N (host H)."""
    from .distributed import rank

    return f"rank {rank()} (host {socket.gethostname()})"


def meet(outcome: dict, cuda: bool) -> list[dict]:
    """Every rank's outcome of its share ({"failed": "" or why, ...}), in rank order; a VlmtuneError on every rank
    when any rank failed."""
    outcomes = gathered({**outcome, "where": where()}, cuda)
    failed = [o for o in outcomes if o["failed"]]
    if failed:
        raise failure("; ".join(f"{o['where']}: {o['failed']}" for o in failed))
    return outcomes


def said_by_all(error: VlmtuneError, cuda: bool) -> None:
    """Before every rank raises `error` at once: each prints it (naming itself) and waits until all have, since
    the launcher ends every process as soon as one exits, which could cut the others' error line."""
    from .distributed import world_size

    if world_size() > 1:
        print(f"{where()}: error: {error}", file=sys.stderr, flush=True)
        gathered(None, cuda)


def failure(said: str) -> VlmtuneError:
    """The error every rank raises when the pre-pass failed on some: `said` names the ranks and what they hit."""
    return VlmtuneError(f"vision feature cache: the pre-pass failed on {said} (every process stops); fix that "
                        f"process's problem, or set {FIELD}: false")


def _missing(store, keys: set[str]) -> set[str]:
    gone = {k for k in keys if not store.path(k).is_file()}
    deadline = time.monotonic() + SETTLE_S
    pause = 0.5
    while gone and time.monotonic() < deadline:
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause *= 2
        listed: dict = {}
        for k in gone:  # listing a folder makes a network filesystem look again (a stat may answer from its cache)
            parent = store.path(k).parent
            if parent not in listed:
                try:
                    listed[parent] = set(os.listdir(parent))
                except OSError:
                    listed[parent] = set()
        gone = {k for k in gone if store.path(k).name not in listed[store.path(k).parent]}
    return gone


def check_shared(store, keys: set[str], cuda: bool) -> None:
    """After every rank built its share: each rank looks for every entry of the run (`keys`); when some rank lacks
    any, every rank raises a VlmtuneError naming the folder, the ranks and hosts, and the fix."""
    gone = _missing(store, keys)
    seen = gathered({"where": where(), "missing": len(gone), "folder": str(store.folder)}, cuda)
    lacking = [s for s in seen if s["missing"]]
    if not lacking:
        return
    folders = sorted({s["folder"] for s in seen})
    named = folders[0] if len(folders) == 1 else " / ".join(folders)
    said = ", ".join(f"{s['where']} lacks {s['missing']} of {len(keys)}" for s in lacking)
    raise VlmtuneError(f"vision feature cache: the processes do not share one cache folder ({named}): each rank "
                       f"wrote its share of the entries there, and {said}; every node must see the same folder: set "
                       f"$VLMTUNE_CACHE to a path on a shared filesystem, or set {FIELD}: false")
