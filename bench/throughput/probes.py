"""What an arm measures inside its trainer: epoch clocks, vision-tower calls, the tokens of each batch.

`Probe.attach(trainer, ...)` adds a TrainerCallback (GPU synchronised at every clock reading), a forward hook
on the vision tower (counting calls) and a wrapper around `trainer.compute_loss` that counts each batch's
positions, non-pad tokens and labels in the main process (DataLoader workers collate, so counting in the
collator would miss them). The same probe goes into every arm.
"""

from __future__ import annotations

import time

IGNORE_INDEX = -100


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def make_probe(pad_token_id: int, vision_prefix: str, profile_step: int | None = None):
    from transformers import TrainerCallback

    from .profile import StepProfile

    class Probe(TrainerCallback):
        def __init__(self):
            self.pad_token_id, self.vision_prefix = pad_token_id, vision_prefix
            self.counts = {"vision_calls": 0, "batches": 0, "positions": 0, "non_pad": 0, "supervised": 0}
            self.epochs: list[dict] = []
            self.t_begin = self.t_end = self.t_first_step = None
            self.vision_calls_before_train = None
            self._epoch_start = None
            self._epoch_counts = None
            self.profile = StepProfile(profile_step, vision_prefix) if profile_step else None

        def attach(self, trainer) -> None:
            vision = base_model(trainer.model).get_submodule(self.vision_prefix)
            vision.register_forward_hook(self._on_vision)
            original = trainer.compute_loss

            def counted_loss(model, inputs, *args, **kwargs):
                self._count(inputs)
                return original(model, inputs, *args, **kwargs)

            trainer.compute_loss = counted_loss
            if self.profile is not None:
                self.profile.attach(trainer.model)
            trainer.add_callback(self)

        def _on_vision(self, *_):
            self.counts["vision_calls"] += 1

        def _count(self, inputs: dict) -> None:
            ids = inputs.get("input_ids")
            mask = inputs.get("attention_mask")
            labels = inputs.get("labels")
            c = self.counts
            c["batches"] += 1
            if ids is not None:
                c["positions"] += ids.numel()
                c["non_pad"] += int(mask.sum()) if mask is not None else int((ids != self.pad_token_id).sum())
            if labels is not None:
                c["supervised"] += int((labels[:, 1:] != IGNORE_INDEX).sum())  # labels the loss uses (shifted)

        def on_train_begin(self, args, state, control, **kwargs):
            _sync()
            self.t_begin = time.perf_counter()
            self.vision_calls_before_train = self.counts["vision_calls"]

        def on_epoch_begin(self, args, state, control, **kwargs):
            _sync()
            self._epoch_start, self._epoch_cpu = time.perf_counter(), time.process_time()
            self._epoch_counts = dict(self.counts)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profile is not None:
                self.profile.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.profile is not None:
                self.profile.end()
            if self.t_first_step is None:
                _sync()
                self.t_first_step = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            _sync()
            now = time.perf_counter()
            entry = {"seconds": now - self._epoch_start, "cpu_seconds": time.process_time() - self._epoch_cpu,
                     "steps_at_end": state.global_step}
            entry.update({k: self.counts[k] - self._epoch_counts[k] for k in self.counts})
            self.epochs.append(entry)
            self.t_end = now

        def summary(self) -> dict:
            seconds = sum(e["seconds"] for e in self.epochs)
            return {"epochs": self.epochs, "train_seconds": seconds, "counts": dict(self.counts),
                    "vision_calls_before_train": self.vision_calls_before_train,
                    "first_step_seconds": (self.t_first_step - self.t_begin) if self.t_first_step else None,
                    "profile": self.profile.result if self.profile is not None else None}

    return Probe()


def effective(trainer) -> dict:
    """The trainer's settings as they took effect."""
    model = trainer.model
    args = trainer.args
    base = base_model(model)
    lora = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    return {
        "gradient_checkpointing": bool(getattr(base, "is_activation_checkpointing",
                                               getattr(base, "is_gradient_checkpointing", False))),
        "bf16": args.bf16, "fp16": args.fp16,
        "parameter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "dataloader_num_workers": args.dataloader_num_workers,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs, "max_steps": args.max_steps,
        "collator": type(trainer.data_collator).__name__,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_modules": len(lora), "lora_modules_in_vision": sum(1 for n in lora if ".visual." in n),
    }
