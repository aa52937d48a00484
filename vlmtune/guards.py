"""Run guards: a sample that fails to load is skipped and named; non-finite steps stop the run unsaved.

- Bad samples: the collator lists rows whose media failed under `bad_samples` (DataLoader workers are
  separate processes: only the batch carries what they found). The trainer pops the list before the
  forward, names each sample once in the log, and stops past `data.max_bad_samples`, saving a checkpoint.
- Non-finite steps: a step whose loss or gradient norm is NaN/inf does not reach the weights (its
  gradients are dropped; an fp16 grad scaler skips such a step itself), and `train.max_nonfinite_steps`
  of them in a row stop the run. No checkpoint or adapter is written from non-finite weights. The norm is
  the one the training loop computed (for clipping, or unclipped when max_grad_norm=0); the loss is kept on
  the device, and both are read to the host once per optimizer step.
- Under DeepSpeed the engine steps inside backward(), before the guards see the step: they cannot drop its
  gradients. DeepSpeed's own overflow check skips a NaN/inf step where it runs (fp16 always; in recent
  DeepSpeed, e.g. 0.19, ZeRO-2/3 under bf16 and fp32 too, ZeRO-2 bf16 unless bf16.check_grad_overflow is
  false); such steps count towards `train.max_nonfinite_steps` as above. Where it does not run, the NaN
  reaches the weights: they are checked after every non-finite step, and the run stops at that step, saving
  nothing from it (as if train.max_nonfinite_steps were 1).

Every decision is agreed across ranks once per optimizer step (one small all-reduce), so all ranks
save, stop or go on together.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from .checkpoints import newest_complete
from .errors import VlmtuneError

SHOWN = 30  # bad samples listed in a stop message


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class BadSamples:
    """The samples skipped so far, each named once (by its file:row source) as it is first seen."""

    def __init__(self, limit: int, log=print):
        self.limit = limit
        self.log = log
        self.seen: dict[str, str] = {}  # source -> reason
        self.pending: list[dict] = []  # found on this rank since the ranks last agreed

    def add(self, items, local: bool = True) -> None:
        for item in items:
            if item["source"] in self.seen:
                continue
            self.seen[item["source"]] = item["reason"]
            if local:
                self.pending.append(item)
            self.log(f"skipped bad sample {len(self.seen)} (data.max_bad_samples={self.limit}): "
                     f"{item['source']}: {item['reason']}")

    @property
    def over_limit(self) -> bool:
        return len(self.seen) > self.limit

    def listing(self) -> list[dict]:
        return [{"source": s, "reason": r} for s, r in self.seen.items()]

    def render(self) -> str:
        lines = [f"  - {s}: {r}" for s, r in list(self.seen.items())[:SHOWN]]
        if len(self.seen) > SHOWN:
            lines.append(f"  ... and {len(self.seen) - SHOWN} more")
        return "\n".join(lines)


class NonFiniteSteps:
    """Consecutive optimizer steps whose loss or gradient norm was NaN/inf.

    A step that an fp16 grad scaler skipped because the scaled gradients overflowed (the loss itself
    finite) is the scaler working as designed: it does not count, and it does not end a run either.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.run = 0
        # the step's first non-finite micro-batch loss, else its last: a device tensor until settle() reads it
        self.loss: torch.Tensor | float | None = None
        self.grad_norm: torch.Tensor | float | None = None  # the training loop's, as it computed it

    def note_loss(self, loss: torch.Tensor) -> None:
        """On the device: no host sync per micro-batch."""
        self.loss = loss if self.loss is None else torch.where(torch.isfinite(self.loss), loss, self.loss)

    def settle(self) -> tuple[bool, bool]:
        """Whether the step's loss and gradient norm are non-finite, read to the host in one transfer."""
        self.loss, self.grad_norm = _host_floats(self.loss, self.grad_norm)
        return _nonfinite(self.loss), _nonfinite(self.grad_norm)

    def step_is_bad(self, scaler_skipped: bool) -> bool:
        loss_bad, grad_bad = self.settle()
        return loss_bad or (grad_bad and not scaler_skipped)

    def end_step(self, bad: bool) -> None:
        self.run = self.run + 1 if bad else 0

    def reset_step(self) -> None:
        self.loss = self.grad_norm = None


def _nonfinite(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


def _host_floats(*values):
    """The tensors among values as Python floats, read in one device-to-host copy (others as they are)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return values
    device = tensors[0].device
    read = iter(torch.stack([t.detach().float().reshape(()).to(device) for t in tensors]).tolist())
    return tuple(next(read) if isinstance(v, torch.Tensor) else v for v in values)


def nonfinite_weights(model) -> list[str]:
    """Names of trainable weights holding NaN/inf on this rank (its ZeRO-3 slice where partitioned)."""
    named = [(n, getattr(p, "ds_tensor", p)) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu().tolist()
    return [n for (n, _), ok in zip(named, finite, strict=True) if not ok]


class GuardedTrainer:
    """Trainer mixin (put it before the Trainer class): bad-sample and non-finite guards."""

    def __init__(self, *args, max_bad_samples: int = 10, max_nonfinite_steps: int = 3, log=print, **kwargs):
        self.bad_samples = BadSamples(max_bad_samples, log)
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self.stop_reason: str | None = None  # "bad_samples" | "nonfinite" once the guards stop the run
        self.stop_message = ""
        super().__init__(*args, **kwargs)
        self.add_callback(GuardCallback(self))

    # ---------------------------------------------------------------- what each step reports
    def compute_loss(self, model, inputs, *args, **kwargs):
        self.bad_samples.add(inputs.pop("bad_samples", ()))  # train and eval batches alike
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.nonfinite.note_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The training loop's gradient norm (clipping's; computed unclipped when max_grad_norm=0; under
        DeepSpeed the engine's), kept for the guards instead of being computed a second time."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.nonfinite.grad_norm = grad_norm
        return grad_norm

    def check_gradients(self, model) -> None:
        """Before the optimizer step (the step's one host read): a non-finite loss or gradient norm drops the
        gradients, so the step cannot write NaN into the weights. An fp16 grad scaler, where there is one, skips
        that step itself; under DeepSpeed the engine stepped already, inside backward (see the module doc)."""
        loss_bad, grad_bad = self.nonfinite.settle()
        if (loss_bad or grad_bad) and self.accelerator.scaler is None and not self.is_deepspeed_enabled:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = None

    # ---------------------------------------------------------------- once per optimizer step, all ranks
    def guard_step(self) -> str | None:
        """Agree across ranks on this step; 'bad_samples' or 'nonfinite' when the run must stop."""
        # only a loss scaler's skip is benign; DeepSpeed's overflow check also skips NaN steps under bf16/fp32
        scaler_skipped = self.args.fp16 and self.accelerator.optimizer_step_was_skipped
        bad = self.nonfinite.step_is_bad(scaler_skipped=scaler_skipped)
        loss, grad_norm = self.nonfinite.loss, self.nonfinite.grad_norm
        self.nonfinite.reset_step()
        if _distributed():
            bad = self._agree(bad)
        self.nonfinite.end_step(bad)
        broken = bad and bool(self._nonfinite_weight_names())
        if broken or self.nonfinite.run >= self.nonfinite.limit:
            self.stop_reason, self.stop_message = "nonfinite", self._nonfinite_message(loss, grad_norm, broken)
        elif self.bad_samples.over_limit:
            self.stop_reason = "bad_samples"  # its message names the checkpoint saved after this step
        return self.stop_reason

    def _agree(self, bad: bool) -> bool:
        """All-reduce this rank's verdict and new bad samples; every rank merges the others' samples."""
        pending, self.bad_samples.pending = self.bad_samples.pending, []
        flags = torch.tensor([len(pending), int(bad)], device=self.args.device)
        torch.distributed.all_reduce(flags)
        if flags[0].item() > 0:
            everyone: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, pending)
            for items in everyone:
                self.bad_samples.add(items, local=False)
        return flags[1].item() > 0

    def _nonfinite_weight_names(self) -> list[str]:
        names = nonfinite_weights(self.model)
        if _distributed():
            count = torch.tensor([len(names)], device=self.args.device)
            torch.distributed.all_reduce(count)
            if count.item() and not names:
                names = ["(on another rank)"]
        return names

    def _nonfinite_message(self, loss, grad_norm, weights_broken: bool = False) -> str:
        step, limit = self.state.global_step, self.nonfinite.limit
        what = (f"the trainable weights became non-finite at step {step}" if weights_broken else
                f"{self.nonfinite.run} consecutive steps (train.max_nonfinite_steps={limit}) had a non-finite loss "
                f"or gradient norm, the last at step {step}")
        return (f"training stopped: {what} (loss {loss}, grad norm {grad_norm}); nothing non-finite was saved"
                f"{self._checkpoint_note()}. {self._advice()}")

    def _advice(self) -> str:
        fp16 = " and use model.dtype: bfloat16 instead of float16 (fp16 overflows)" if self.args.fp16 else ""
        return (f"Try a lower train.learning_rate (now {self.args.learning_rate:g}), check the data of the last "
                f"steps{fp16}.")

    def _checkpoint_note(self) -> str:
        last = self._last_checkpoint()
        return f"; the last checkpoint is {last} (train.resume_from_checkpoint=latest resumes from it)" if last else ""

    def _last_checkpoint(self) -> Path | None:
        return newest_complete(Path(self.args.output_dir))

    # ---------------------------------------------------------------- saving and the end of the run
    def _save_checkpoint(self, model, trial):
        self.require_finite_weights(f"checkpoint at step {self.state.global_step}")
        super()._save_checkpoint(model, trial)

    def require_finite_weights(self, what: str) -> None:
        """Collective under multi-process: every rank calls it before a save."""
        names = self._nonfinite_weight_names()
        if names:
            raise VlmtuneError(f"not saving the {what}: NaN/inf in {len(names)} trainable weight tensor(s), e.g. "
                               f"{names[0]}{self._checkpoint_note()}. {self._advice()}")

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.stop_reason == "bad_samples":
            b, n = self.bad_samples, len(self.bad_samples.seen)
            raise VlmtuneError(
                f"{n} sample{'s' if n != 1 else ''} could not be loaded, more than data.max_bad_samples={b.limit}:\n"
                f"{b.render()}\ntraining stopped at step {self.state.global_step}; checkpoint saved: "
                f"{self._last_checkpoint()}. Repair these files (`vlmtune validate --decode` finds broken images), "
                "then resume with train.resume_from_checkpoint=latest; to go on without them, resume with "
                "data.max_bad_samples raised and data.check_images=header (decoding up front refuses broken files). "
                "Removing rows or changing an image's size changes the data: that is a new run (another output_dir, "
                "or --overwrite).")
        if self.stop_reason == "nonfinite":
            raise VlmtuneError(self.stop_message)
        self.require_finite_weights("trained adapter")
        return output

    def bad_sample_report(self) -> dict:
        """train_results.json fields. Collective under multi-process (merges what evaluation found last)."""
        if _distributed():
            self._agree(False)
        return {"bad_sample_count": len(self.bad_samples.seen), "bad_samples": self.bad_samples.listing()}


class GuardCallback(TrainerCallback):
    """Calls the trainer's guards at the points of the loop where they apply."""

    def __init__(self, trainer: GuardedTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer.check_gradients(model if model is not None else self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        verdict = self.trainer.guard_step()
        if verdict is not None:
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_save = verdict == "bad_samples"  # never a checkpoint of non-finite weights
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.stop_reason is not None:  # stopped: no epoch-end evaluation or save on top
            control.should_evaluate = control.should_save = False
        return control
