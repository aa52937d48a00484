"""The range of every number in a recipe: what each numeric field allows, and the message for a value outside it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """The values a numeric field allows: [low, high] (either end open or absent), plus a few special values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()  # values allowed outside the range (max_steps: -1)
    meaning: str = ""  # what an edge or special value means, shown in the message

    def allows(self, v) -> bool:
        if v in self.also:
            return True
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def describe(self, integer: bool) -> str:
        if self.high is not None and self.low is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif integer and self.low == 1 and not self.low_open:
            text = "a positive integer"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return " or ".join([*(str(a) for a in self.also), text])

    def problem(self, v, integer: bool) -> str | None:
        """The message for a value outside the range (non-finite included), None for one inside."""
        why = f"; {self.meaning}" if self.meaning else ""
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number ({self.describe(integer)}), got {v}{why}"
        return None if self.allows(v) else f"must be {self.describe(integer)}, got {v}{why}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE, NON_NEGATIVE = Bound(0, low_open=True), Bound(0)
PATCH = POSITIVE  # the least pixel bound depends on the family (its patch x merge): checked with the model
COUNT = Bound(1)  # a positive integer
BOUNDS = {  # every int and float field of the schema: tests/test_config.py fails on a field missing here
    "lora.r": COUNT, "lora.alpha": POSITIVE, "lora.dropout": Bound(0, 1, high_open=True),
    "data.max_length": COUNT, "data.min_pixels": PATCH, "data.max_pixels": PATCH,
    "data.video_fps": Bound(0, low_open=True, meaning="frames sampled per second"),
    "data.video_max_frames": Bound(2, meaning="frames are grouped in pairs"),
    "data.video_min_pixels": PATCH, "data.video_max_pixels": PATCH, "data.num_workers": NON_NEGATIVE,
    "data.max_image_pixels": Bound(1, 178_956_970, meaning="Pillow refuses larger images"), "data.max_bad_samples": Bound(0, meaning="0 stops on the first bad sample"),
    "data.max_row_bytes": COUNT,
    "data.near_duplicate_distance": Bound(0, 32, meaning="bits of the 64-bit perceptual hash"),
    "data.prefetch_factor": COUNT,
    "train.num_train_epochs": NON_NEGATIVE,
    "train.max_steps": Bound(1, also=(-1,), meaning="-1 trains for num_train_epochs"),
    "train.per_device_train_batch_size": COUNT, "train.per_device_eval_batch_size": COUNT,
    "train.gradient_accumulation_steps": COUNT, "train.learning_rate": POSITIVE, "train.weight_decay": NON_NEGATIVE,
    "train.warmup_ratio": Bound(0, 1, high_open=True),
    "train.max_grad_norm": Bound(0, meaning="0 turns gradient clipping off"),
    "train.logging_steps": COUNT, "train.save_steps": COUNT,
    "train.save_total_limit": Bound(1, meaning="null keeps every checkpoint"), "train.eval_steps": COUNT,
    "train.seed": Bound(0, 2**32 - 1), "train.max_nonfinite_steps": COUNT,
    "train.eval_generate_samples": COUNT, "train.eval_max_new_tokens": COUNT,
    "distributed.num_processes": COUNT, "distributed.num_nodes": COUNT, "distributed.node_rank": NON_NEGATIVE,
    "distributed.master_port": Bound(1, 65535, meaning="a TCP port"),
    "dpo.beta": POSITIVE, "dpo.sft_weight": Bound(0, meaning="0 adds no SFT term"),
    "contrastive.eval_batch_size": COUNT,
}
