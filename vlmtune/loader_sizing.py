"""DataLoader workers, prefetch and pinned memory, and torch's thread count, sized to the CPUs this process may use.

OpenMP threads spin while they wait for each other: when a run's compute threads plus its busy DataLoader workers
(plus other work on the machine) outnumber the free cores, a descheduled thread stalls every parallel region, and a
run slows by an order of magnitude instead of in proportion. So each rank takes its share of the CPUs it may run on
(os.sched_getaffinity, split between the processes on this machine), gives the workers their part, keeps torch's
intra-op threads to the rest (at least one) and, when other work already holds cores (idle_cpus: the affinity mask
does not show it), to the cores found idle; each worker runs on one thread. Nothing here sets anything:
distributed/process.py sets the threads, the Trainer's arguments carry the rest."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

MAX_WORKERS_GPU = 8  # image decoding for one GPU rarely needs more; each worker holds a copy of the dataset
MAX_WORKERS_CPU = 4
PREFETCH_GPU, PREFETCH_CPU = 4, 2  # batches each worker loads ahead (torch's default is 2)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Sizing:
    cpus: int  # CPUs this process may run on
    share: int  # this rank's share of them
    workers: int
    prefetch_factor: int | None  # None without workers (the DataLoader refuses one)
    pin_memory: bool
    persistent_workers: bool
    threads: int | None  # torch intra-op threads to set; None: the user's setting is kept
    note: str  # the figures and choices, one line

    def line(self) -> str:
        return f"data loading and threads: {self.note}"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def idle_cpus(window: float = 0.3) -> float | None:
    """How many of this process's CPUs sat idle over `window` seconds (/proc/stat; None where it cannot be read):
    other work on the machine, which its affinity mask does not show. The caller sleeps meanwhile, so its own
    use is not counted."""
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        return None

    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            name, *ticks = line.split()
            if name in mine and len(ticks) >= 5:
                values = [int(t) for t in ticks[:8]]
                out[name] = (values[3] + values[4], sum(values))  # idle + iowait, all
        return out

    first = sample()
    time.sleep(window)
    second = sample()
    idle = sum(second[c][0] - first[c][0] for c in second if c in first)
    total = sum(second[c][1] - first[c][1] for c in second if c in first)
    return len(second) * idle / total if total > 0 and second else None


def local_processes(world_size: int, num_nodes: int) -> int:
    """Training processes on this machine (the launcher's LOCAL_WORLD_SIZE, else the world split over the nodes)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    return max(1, world_size // max(1, num_nodes))


def user_threads(current: int, default: int) -> str:
    """How the user set torch's threads ("" when they did not): an environment variable, or torch.set_num_threads
    (`current` differs from `default`, the count torch started with)."""
    for name in THREAD_VARIABLES:
        if os.environ.get(name, "").strip():
            return f"{name}={os.environ[name].strip()}"
    return f"torch.set_num_threads({current})" if current != default else ""


def size(num_workers: int | None, prefetch_factor: int | None, device: str, processes: int = 1,
         current_threads: int | None = None, default_threads: int | None = None, idle: float | None = None) -> Sizing:
    """The loading and thread sizes for one rank. `num_workers` / `prefetch_factor`: the recipe's (None: chosen);
    `current_threads` / `default_threads`: torch's thread count now and at start (to keep a user's own); `idle`:
    the CPUs found idle (idle_cpus), which lowers the thread count when other work holds the rest."""
    cpus = available_cpus()
    share = max(1, cpus // max(1, processes))
    cuda = device == "cuda"
    if num_workers is None:  # on a GPU the main process only drives it; on a CPU it computes with all its threads
        workers = max(0, min(MAX_WORKERS_GPU, share - 1)) if cuda else max(0, min(MAX_WORKERS_CPU, share // 4))
    else:
        workers = num_workers
    prefetch = (prefetch_factor or (PREFETCH_GPU if cuda else PREFETCH_CPU)) if workers > 0 else None
    kept = user_threads(current_threads, default_threads) if current_threads is not None else ""
    threads = None if kept else max(1, share - workers)
    busy = idle is not None and threads is not None and round(idle / max(1, processes)) < threads
    if busy:  # other work holds some of the cores: as many threads as are idle, so a barrier never waits on a
        threads = max(1, round(idle / max(1, processes)))  # descheduled thread (the order-of-magnitude slowdown)
    parts = [f"{cpus} CPUs available", f"{share} for this rank of {processes}" if processes > 1 else "",
             f"{workers} DataLoader worker{'s' if workers != 1 else ''} (1 thread each)",
             f"prefetch {prefetch}" if prefetch else "", "pinned memory" if cuda else "",
             f"{idle:.1f} idle" if idle is not None else "",
             f"torch threads kept as set ({kept})" if kept else f"{threads} torch thread{'s' if threads != 1 else ''}"
             + (" (other work holds the other cores)" if busy else ""),
             "data.prefetch_factor unused without workers" if prefetch_factor and not workers else ""]
    return Sizing(cpus, share, workers, prefetch, cuda, workers > 0, threads, ", ".join(p for p in parts if p))


def limit_worker_threads(worker_id: int) -> None:
    """A DataLoader worker_init_fn: one thread for torch and the BLAS/OpenMP pools in each worker, so the workers'
    image processing does not compete with the training threads."""
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def with_thread_limit(worker_init_fn):
    """`worker_init_fn` (the Trainer's seeding, or None) preceded by limit_worker_threads; picklable for spawn."""
    return partial(_limited_then, worker_init_fn)


def _limited_then(then, worker_id: int) -> None:
    limit_worker_threads(worker_id)
    if then is not None:
        then(worker_id)


def limit_loader_threads(loader):
    """The DataLoader with its workers limited to one thread each (read when its worker processes start)."""
    init = getattr(loader, "worker_init_fn", None)
    if getattr(loader, "num_workers", 0) and not (isinstance(init, partial) and init.func is _limited_then):
        loader.worker_init_fn = with_thread_limit(init)
    return loader
