"""One training step profiled (`--profile-step K`): wall time of the vision tower's, the decoder's and the LM
head's forward calls (backward and optimizer: the rest of the step), and torch.profiler's top operators."""

from __future__ import annotations

import time

from .probes import base_model


class StepProfile:
    def __init__(self, step: int, vision_prefix: str, top: int = 12):
        self.step, self.vision_prefix, self.top = step, vision_prefix, top
        self.result: dict | None = None
        self._prof = self._t0 = None
        self._active = False
        self._seconds: dict[str, float] = {}
        self._starts: dict[str, float] = {}

    def attach(self, model) -> None:
        base = base_model(model)
        inner = getattr(base, "model", base)
        modules = {"vision_tower": base.get_submodule(self.vision_prefix),
                   "decoder": getattr(inner, "language_model", None), "lm_head": base.get_output_embeddings()}
        for name, module in modules.items():
            if module is not None:
                module.register_forward_pre_hook(lambda *_, n=name: self._start(n))
                module.register_forward_hook(lambda *_, n=name: self._stop(n))

    def _start(self, name: str) -> None:
        if self._active:
            self._starts[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        if self._active and name in self._starts:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - self._starts.pop(name)

    def begin(self, global_step: int) -> None:
        if global_step + 1 != self.step or self.result is not None:
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._active, self._t0 = True, time.perf_counter()

    def end(self) -> None:
        if not self._active:
            return
        step_seconds = time.perf_counter() - self._t0
        self._active = False
        self._prof.__exit__(None, None, None)
        ops = sorted(self._prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: self.top]
        forward = dict(self._seconds)
        self.result = {
            "step": self.step, "step_seconds": step_seconds,
            "forward_seconds": forward,
            "rest_seconds": step_seconds - sum(forward.values()),  # backward, optimizer, data wait, Python
            "top_ops_self_cpu": [{"op": e.key, "seconds": e.self_cpu_time_total / 1e6, "calls": e.count}
                                 for e in ops],
        }
