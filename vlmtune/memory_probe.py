"""`train.gradient_checkpointing: auto`: decided from one measured forward+backward of the longest training batch.

Without checkpointing a step keeps every layer's activations for the backward pass; with it, they are recomputed
(about a third more compute). `auto` runs the longest batch once without it and turns it on only when that step's
peak, plus the optimizer's state, would not fit in a safe share of the memory: the GPU's (torch's peak counter, an
out-of-memory error counting as too big) or, on a CPU, the RAM still available (the process's peak RSS growth)."""

from __future__ import annotations

import contextlib
import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config.schema import switch

GPU_SHARE = 0.80  # of the memory this process may use: the allocator's fragmentation and longer eval batches
CPU_SHARE = 0.70  # of the RAM available: the allocator, the DataLoader workers and the page cache need the rest
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter (the optimizer is made after the probe)
GIB = 2**30


@dataclass(frozen=True)
class Checkpointing:
    """The decision: on or off, why (one line), and the figures it was made from (recorded in the run's files)."""

    enabled: bool
    reason: str
    figures: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"gradient checkpointing: {'on' if self.enabled else 'off'} ({self.reason})"

    def record(self) -> dict:
        return {"enabled": self.enabled, "reason": self.reason, **self.figures}


def fixed_choice(setting: object, deepspeed: bool, zero_stage: int, quantized: bool) -> Checkpointing | None:
    """The decision made without a measured step: the recipe's true/false, and the cases where auto cannot measure
    safely; None where auto measures."""
    value = switch(setting)
    if value in ("true", "false"):
        return Checkpointing(value == "true", f"train.gradient_checkpointing: {value}")
    if zero_stage == 3:
        return Checkpointing(True, "auto under ZeRO-3: the weights stay partitioned across the ranks until the "
                             "DeepSpeed engine starts, so no step can be measured before training, and a sharded "
                             "run is one whose activations must stay small; set it to false to train without")
    if deepspeed:
        return Checkpointing(True, "auto under DeepSpeed: the engine places the model on the GPU only when training "
                             "starts, so no step can be measured before; set it to false to train without")
    if quantized:
        return Checkpointing(True, "auto with quantization: a 4/8-bit run is chosen to fit a model into little "
                             "memory, and checkpointing is what keeps its activations small too; set it to false "
                             "to train faster where the memory allows")
    return None


def longest_batch(lengths: list[int], batch_size: int) -> list[int]:
    """Indices of the batch_size longest examples (the first of equal ones): the training batch with most tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return sorted(order[:batch_size])


def measured_choice(step: Callable[[], None], device: str, trainable: int) -> Checkpointing:
    """Run `step` (one forward+backward without checkpointing that frees what it made) and decide from its peak.

    `trainable`: trainable parameters, whose optimizer state the step does not hold yet."""
    optimizer = trainable * ADAM_STATE_BYTES
    measure = _cuda_peak if device == "cuda" else _cpu_peak
    peak, room, figures = measure(step)
    figures = {"measured_on": device, "optimizer_state_gib": round(optimizer / GIB, 3), **figures}
    if peak is None:
        return Checkpointing(True, f"auto: the longest batch ran out of memory without it ({_figures(figures)})",
                             figures)
    need = peak + optimizer
    share = GPU_SHARE if device == "cuda" else CPU_SHARE
    fits = need <= share * room
    figures.update(step_peak_gib=round(peak / GIB, 3), need_gib=round(need / GIB, 3),
                   budget_gib=round(share * room / GIB, 3))
    verdict = "fits in" if fits else "exceeds"
    return Checkpointing(not fits, f"auto: the longest batch without it needs {need / GIB:.2f} GiB, which {verdict} "
                         f"{share:.0%} of {room / GIB:.2f} GiB {'free on the GPU' if device == 'cuda' else 'RAM available'}"
                         f"; {_figures(figures)}", figures)


def _figures(figures: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in figures.items() if k not in ("step_peak_gib", "need_gib", "budget_gib"))


def _cuda_peak(step) -> tuple[int | None, int, dict]:
    """Allocated bytes at the step's peak, the model included (None: out of memory), bytes this process may use
    (free plus what its allocator holds), the figures."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    held = torch.cuda.memory_allocated()
    room = free + torch.cuda.memory_reserved()  # what this process's allocator already holds is usable too
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        peak = None
    torch.cuda.empty_cache()
    figures = {"device_total_gib": round(total / GIB, 2), "model_gib": round(held / GIB, 3),
               "step_seconds": round(time.perf_counter() - start, 3)}
    return peak, room, figures


def _cpu_peak(step) -> tuple[int | None, int, dict]:
    """Peak RSS growth of the step (the kernel's high-water mark, reset first), and the RAM still available."""
    available = available_ram()
    _trim_heap()
    before = _rss()
    reset = _reset_peak_rss()
    start = time.perf_counter()
    try:
        step()
    except MemoryError:
        return None, available, {"ram_available_gib": round(available / GIB, 2)}
    growth = max(0, (_peak_rss() if reset else _rss()) - before)
    figures = {"ram_available_gib": round(available / GIB, 2), "rss_gib": round(before / GIB, 3),
               "peak_from": "VmHWM" if reset else "RSS after the step", "step_seconds": round(time.perf_counter() - start, 3)}
    return growth, available, figures


def available_ram() -> int:
    """Bytes of RAM this process can still take: psutil's or /proc/meminfo's available memory, lowered to what is left
    under the cgroup's memory limit when one is set."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        match = re.search(r"MemAvailable:\s+(\d+) kB", _read("/proc/meminfo"))
        available = int(match.group(1)) * 1024 if match else 0
    limit, used = _read("/sys/fs/cgroup/memory.max").strip(), _read("/sys/fs/cgroup/memory.current").strip()
    if limit.isdigit() and used.isdigit():
        available = min(available, int(limit) - int(used))
    return max(available, 0)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _status_kib(key: str) -> int:
    match = re.search(rf"{key}:\s+(\d+) kB", _read("/proc/self/status"))
    return int(match.group(1)) * 1024 if match else 0


def _rss() -> int:
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    return _status_kib("VmHWM")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss() > 0
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the system first, so that the step's growth is not hidden by reused pages."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------ the trainer side: one step, then apply


def probe_step(trainer, batch: dict) -> Callable[[], None]:
    """One forward+backward of `batch` through the trainer's own loss (label-only loss included), leaving the model,
    its gradients, the random state and the trainer's logged metrics as they were."""

    def step() -> None:
        model = trainer.model
        was_training = model.training
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        metrics, tokens = copy.deepcopy(trainer._metrics), trainer._total_train_tokens
        model.train()
        try:
            inputs = trainer._prepare_inputs({k: v for k, v in batch.items() if k != "bad_samples"})
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            del loss, inputs
        finally:
            model.zero_grad(set_to_none=True)  # the first real step must not add the probe's gradients
            model.train(was_training)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            trainer._metrics, trainer._total_train_tokens = metrics, tokens

    return step


def enable_checkpointing(trainer) -> None:
    """Turn checkpointing on for a built trainer, as its arguments would have (non-reentrant; the Trainer enables it
    on the model when training starts)."""
    args = trainer.args
    kwargs = {"use_reentrant": False}
    for prefix in ("activation", "gradient"):
        if hasattr(args, f"{prefix}_checkpointing"):
            setattr(args, f"{prefix}_checkpointing", True)
            setattr(args, f"{prefix}_checkpointing_kwargs", dict(kwargs))
    if hasattr(trainer.model, "enable_input_require_grads"):  # as TRL does for a PEFT model
        trainer.model.enable_input_require_grads()


def agree(enabled: bool) -> bool:
    """Every process's decision made one: on when any process needs it (ranks must train alike)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return enabled
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(enabled)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def measure_for(trainer, dataset, lengths: list[int], batch_size: int, device: str,
                collator=None) -> Checkpointing:
    """auto for a built trainer: its longest training batch measured without checkpointing, checkpointing turned on
    when that does not fit (on every process when any needs it)."""
    collator = collator or trainer.data_collator
    try:
        batch = collator([dataset[i] for i in longest_batch(lengths, batch_size)])
    except Exception as e:  # noqa: BLE001 (a sample that fails to load: the guards handle it in training)
        choice = Checkpointing(True, f"auto: the longest batch could not be loaded to measure it ({e}); on to be safe")
    else:
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        try:
            choice = measured_choice(probe_step(trainer, batch), device, trainable)
        except Exception as e:  # noqa: BLE001 (training meets the same error and reports it where it happens)
            choice = Checkpointing(True, f"auto: the longest batch could not be measured ({type(e).__name__}: {e}); "
                                   "on to be safe")
        del batch
    if agree(choice.enabled) and not choice.enabled:
        choice = Checkpointing(True, f"{choice.reason}; on because another process's longest batch does not fit",
                               choice.figures)
    if choice.enabled:
        enable_checkpointing(trainer)
    return choice
