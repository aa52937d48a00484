"""Non-finite losses and gradients never reach the weights or a saved file; train.max_nonfinite_steps of them in a
row stop the run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import vlmtune
from vlmtune.guards import NonFiniteSteps
from vlmtune.training import build_trainer

from .test_training import recipe_for, small_data  # noqa: F401 (a fixture)


def test_the_count_is_of_consecutive_steps_and_scaler_overflows_do_not_count():
    steps = NonFiniteSteps(limit=3)

    def step(loss, grad_norm, skipped=False):
        steps.note_loss(torch.tensor(loss))
        steps.grad_norm = grad_norm
        bad = steps.step_is_bad(scaler_skipped=skipped)
        steps.end_step(bad)
        steps.reset_step()
        return bad

    assert not step(1.0, 0.5)
    assert step(math.nan, math.nan) and step(1.0, math.inf) and steps.run == 2  # no scaler: a NaN gradient counts
    assert not step(1.0, 0.5) and steps.run == 0  # a finite step ends the run of bad ones
    assert not step(1.0, math.inf, skipped=True)  # fp16 scaler overflow, skipped by design
    assert step(math.inf, math.inf, skipped=True)  # but a non-finite loss is a real problem
    steps.note_loss(torch.tensor(math.nan))
    steps.note_loss(torch.tensor(2.0))  # a later finite micro-batch does not hide an earlier NaN one
    assert math.isnan(steps.loss)


def test_the_loss_stays_on_the_device_until_the_step_reads_it_once(monkeypatch):
    steps, reads = NonFiniteSteps(limit=3), []
    for name in ("item", "tolist", "__float__", "__bool__"):  # every way a tensor's value reaches the host
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _real=real, _name=name, **k: (reads.append(_name), _real(self, *a, **k))[1])
    for loss in (1.0, math.nan, 2.0):  # micro-batches of one optimizer step
        steps.note_loss(torch.tensor(loss))
    assert reads == []
    steps.grad_norm = torch.tensor(0.5)  # as the training loop computed it
    assert steps.settle() == (True, False) and reads == ["tolist"]  # loss and norm in one transfer
    assert math.isnan(steps.loss) and steps.grad_norm == 0.5


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_nan_loss_stops_the_run_and_writes_no_adapter(small_data, tmp_path, monkeypatch):  # noqa: F811
    from vlmtune.label_loss import LabelOnlyLoss  # the loss layer just below the guards, on either loss path

    real = LabelOnlyLoss.compute_loss

    def nan_after_the_first_step(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * math.nan if self.state.global_step >= 1 and model.training else loss

    monkeypatch.setattr(LabelOnlyLoss, "compute_loss", nan_after_the_first_step)
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"train.max_steps": 10, "train.save_steps": 1,
                                                            "train.save_total_limit": 10,
                                                            "train.per_device_train_batch_size": 2})
    with pytest.raises(vlmtune.VlmtuneError) as caught:
        vlmtune.train(recipe, log=lambda *_: None)
    message = str(caught.value)
    assert "3 consecutive steps (train.max_nonfinite_steps=3)" in message and "the last at step 4" in message
    assert "loss nan" in message and "train.learning_rate (now 0.01)" in message and "checkpoint-3" in message
    out = Path(recipe.output_dir)
    assert not (out / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    saved = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in saved] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # none at the stopping step
    for folder in saved:  # the NaN steps (2, 3) never reached the weights: finite, and unchanged since step 1
        weights = load_file(folder / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), folder.name
    first, last = load_file(saved[0] / "adapter_model.safetensors"), load_file(saved[-1] / "adapter_model.safetensors")
    assert all(torch.equal(first[k], last[k]) for k in first)


@pytest.mark.parametrize(("max_grad_norm", "optimizer_skips"), [(0.0, False), (1.0, False), (1.0, True)])
def test_the_guards_read_the_gradient_norm_the_training_loop_computed(max_grad_norm, optimizer_skips, small_data,  # noqa: F811
                                                                      tmp_path, monkeypatch):
    """The loop's norm (clipping's, or its unclipped one with clipping off) is the one checked, not a second one;
    a step the optimizer skipped without a loss scaler (DeepSpeed's overflow check under bf16/fp32) still counts."""
    from accelerate import Accelerator
    from transformers import Trainer

    real = Trainer._get_grad_norm

    def nan_norm_after_the_first_step(self, model, grad_norm=None):  # the gradients themselves stay finite
        norm = real(self, model, grad_norm=grad_norm)
        return norm * math.nan if self.state.global_step >= 1 else norm

    monkeypatch.setattr(Trainer, "_get_grad_norm", nan_norm_after_the_first_step)
    if optimizer_skips:
        monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"train.max_steps": 10, "train.save_steps": 1,
                                                            "train.save_total_limit": 10,
                                                            "train.max_grad_norm": max_grad_norm})
    trainer, _ = build_trainer(vlmtune.plan(recipe), tmp_path / "ckpt", log=lambda *_: None)
    with pytest.raises(vlmtune.VlmtuneError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "3 consecutive steps (train.max_nonfinite_steps=3)" in message and "grad norm nan" in message
    assert f"the last checkpoint is {tmp_path / 'ckpt' / 'checkpoint-3'}" in message
    from safetensors.torch import load_file

    first, last = (load_file(tmp_path / "ckpt" / f"checkpoint-{k}" / "adapter_model.safetensors") for k in (1, 3))
    assert all(torch.equal(first[k], last[k]) for k in first)  # the flagged steps' gradients were dropped


def test_the_stop_message_names_the_newest_complete_checkpoint(small_data, tmp_path):  # noqa: F811
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"train.max_steps": 5, "train.save_steps": 1,
                                                            "train.save_total_limit": 10})
    trainer, _ = build_trainer(vlmtune.plan(recipe), tmp_path / "ckpt", log=lambda *_: None)
    cut_short = tmp_path / "ckpt" / "checkpoint-40"  # a save cut short in place: no trainer_state.json
    cut_short.mkdir(parents=True)
    (cut_short / "adapter_model.safetensors").write_bytes(b"")
    trainer.add_callback(BreakWeights(step=2))
    with pytest.raises(vlmtune.VlmtuneError) as caught:
        trainer.train()
    assert f"the last checkpoint is {tmp_path / 'ckpt' / 'checkpoint-1'} (train.resume_from_checkpoint" \
        in str(caught.value)


def poison(model) -> None:
    """NaN into one trainable weight, as an optimizer step that the guards cannot see into (DeepSpeed) might write."""
    weight = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        weight.view(-1)[0] = math.nan


class BreakWeights(TrainerCallback):
    def __init__(self, step: int):
        self.step = step  # the optimizer step (1-based) that writes the NaN

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:  # global_step counts the step once it has ended
            poison(model)


class BreakAtTheEnd(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        poison(model)


@pytest.mark.parametrize("save_steps", [1, 1000])
def test_non_finite_weights_are_never_saved_and_stop_the_run_at_once(save_steps, small_data, tmp_path):  # noqa: F811
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"train.max_steps": 5, "train.save_steps": save_steps})
    trainer, _ = build_trainer(vlmtune.plan(recipe), tmp_path / "ckpt", log=lambda *_: None)
    trainer.add_callback(BreakWeights(step=2))
    with pytest.raises(vlmtune.VlmtuneError) as caught:
        trainer.train()
    if save_steps == 1:  # the checkpoint of step 2 would hold the NaN
        assert "not saving the checkpoint at step 2: NaN/inf in 1 trainable weight tensor(s)" in str(caught.value)
        assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")) == ["checkpoint-1"]
    else:  # the next step's loss is NaN, and the weights are found broken: no waiting for 3 such steps
        assert "the trainable weights became non-finite at step 3" in str(caught.value)
        assert not list((tmp_path / "ckpt").glob("checkpoint-*"))


def test_the_trained_adapter_is_checked_before_it_is_written(small_data, tmp_path):  # noqa: F811
    recipe = recipe_for("qwen2_vl", small_data, tmp_path, **{"train.max_steps": 1})
    trainer, _ = build_trainer(vlmtune.plan(recipe), tmp_path / "ckpt", log=lambda *_: None)
    trainer.add_callback(BreakAtTheEnd())
    with pytest.raises(vlmtune.VlmtuneError, match="not saving the trained adapter"):
        trainer.train()
