"""Run guards: a sample that fails to load is skipped and named; non-finite steps stop the run unsaved.

- Bad samples: the collator lists rows whose media failed under `bad_samples` (DataLoader workers are
  separate processes: only the batch carries what they found). The trainer pops the list before the
  forward, names each sample once in the log, and stops past `data.max_bad_samples`, saving a checkpoint.
- Non-finite steps: a step whose loss or gradient norm is NaN/inf does not reach the weights (its
  gradients are dropped; an fp16 grad scaler skips such a step itself), and `train.max_nonfinite_steps`
  of them in a row stop the run. No checkpoint or adapter is written from non-finite weights.

Every decision is agreed across ranks once per optimizer step (one small all-reduce), so all ranks
save, stop or go on together.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

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
        self.loss: float | None = None  # the step's first non-finite micro-batch loss, else its last loss
        self.grad_norm: float | None = None

    def note_loss(self, loss: torch.Tensor) -> None:
        value = float(loss)
        if self.loss is None or math.isfinite(self.loss):
            self.loss = value

    def step_is_bad(self, scaler_skipped: bool) -> bool:
        loss_bad = self.loss is not None and not math.isfinite(self.loss)
        grad_bad = self.grad_norm is not None and not math.isfinite(self.grad_norm)
        return loss_bad or (grad_bad and not scaler_skipped)

    def end_step(self, bad: bool) -> None:
        self.run = self.run + 1 if bad else 0

    def reset_step(self) -> None:
        self.loss = self.grad_norm = None


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

    def check_gradients(self, model) -> None:
        """Before the optimizer step: the gradient norm; non-finite gradients are dropped so the step cannot
        write NaN into the weights (an fp16 grad scaler, where there is one, skips that step itself)."""
        engine = self.model_wrapped if hasattr(self.model_wrapped, "get_global_grad_norm") else None
        if engine is not None:  # DeepSpeed: the engine stepped already, inside backward
            norm = engine.get_global_grad_norm()
            self.nonfinite.grad_norm = None if norm is None else float(norm)
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        self.nonfinite.grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        if not math.isfinite(self.nonfinite.grad_norm) and self.accelerator.scaler is None:
            for p in params:
                p.grad = None

    # ---------------------------------------------------------------- once per optimizer step, all ranks
    def guard_step(self) -> str | None:
        """Agree across ranks on this step; 'bad_samples' or 'nonfinite' when the run must stop."""
        bad = self.nonfinite.step_is_bad(scaler_skipped=self.accelerator.optimizer_step_was_skipped)
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

    def _last_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint

        try:
            return get_last_checkpoint(self.args.output_dir)
        except FileNotFoundError:
            return None

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
                f"{self._last_checkpoint()}. Fix or remove these files (`vlmtune validate --decode` finds broken "
                "images), or raise data.max_bad_samples, then resume with train.resume_from_checkpoint=latest.")
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
