"""Contrastive runs keep their state: complete checkpoints in output_dir/checkpoints, a killed run resumed with
`latest` to the adapter (and recall history) of the uninterrupted run, a changed recipe refused on resume, and
train.best_metric's checkpoint as the final adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.config import RecipeError, load_recipe
from vlmtune.contrastive.pairs import make_shape_captions
from vlmtune.errors import VlmtuneError

TRAINED = ("adapter_model.safetensors", "temperature.safetensors")
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_shape_captions(tmp_path_factory.mktemp("pairs"))


def _recipe(data, out, **train):
    # 48 pairs, 12 a step: 4 steps an epoch, so step 7 is in the second epoch (its own caption draw)
    train = {"max_steps": 7, "per_device_train_batch_size": 12, "gradient_accumulation_steps": 1,
             "learning_rate": 5e-3, "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "logging_steps": 1,
             "save_steps": 3, "eval_steps": 3, "report_to": ["none"], "use_cpu": True, **train}
    return load_recipe(None, {
        "method": "contrastive", "model.name_or_path": "builtin:tiny-clip", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "format": "caption"},
        "train": train, "output_dir": str(out)})  # fmt: skip


def _train(recipe):
    from vlmtune.contrastive.train import run_contrastive

    return run_contrastive(recipe, **QUIET)


def _weights(folder):
    return {name: load_file(folder / name) for name in TRAINED}


def _assert_same_weights(a: dict, b: dict, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], **tolerance, msg=lambda m, k=key: f"{k}: {m}")


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_uninterrupted_adapter(pairs, tmp_path, monkeypatch):
    from vlmtune.contrastive.trainer import EpochCaptions

    whole_out, whole = _train(_recipe(pairs, tmp_path / "whole"))

    def kill(self, args, state, control, **kwargs):
        if state.global_step == 6:  # checkpoint-6 is saved; step 7 (second epoch, batch 3) never runs
            raise Killed

    monkeypatch.setattr(EpochCaptions, "on_step_begin", kill, raising=False)
    with pytest.raises(Killed):
        _train(_recipe(pairs, tmp_path / "run"))
    monkeypatch.undo()
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]  # whole, none staged
    for step in (3, 6):
        saved = {p.name for p in (checkpoints / f"checkpoint-{step}").iterdir()}
        assert {*TRAINED, "adapter_config.json", "trainer_state.json", "vlmtune_resume.json", "optimizer.pt",
                "scheduler.pt"} <= saved, saved
        assert "model.safetensors" not in saved  # the trained part only, not the whole dual encoder
    assert not (run / "vlmtune.json").exists()

    with pytest.raises(VlmtuneError, match="holds a run that did not finish"):  # no resume, no overwrite: refused
        _train(_recipe(pairs, run))
    changed = _recipe(pairs, run, resume_from_checkpoint="latest", learning_rate=1e-3)
    changed.lora.r = 8
    with pytest.raises(VlmtuneError, match=r"(?s)lora\.r: 4 -> 8.*train\.learning_rate: 0\.005 -> 0\.001"):
        _train(changed)

    out, resumed = _train(_recipe(pairs, run, resume_from_checkpoint="latest"))
    assert out == run and resumed["global_step"] == 7
    _assert_same_weights(_weights(out), _weights(whole_out), rtol=1e-5, atol=1e-6)
    # the evaluation at step 3 ran before the kill: the resumed run's history holds it, as the uninterrupted one's
    assert [h["step"] for h in resumed["recall_history"]] == [h["step"] for h in whole["recall_history"]] == [3, 6, 7]
    assert resumed["recall_history"] == whole["recall_history"]  # counts of hits: equal weights, equal recall
    losses = [[h["loss"] for h in json.loads((o / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
               ["log_history"] if "loss" in h] for o in (out, whole_out)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 6
    meta = json.loads((out / "vlmtune.json").read_text())
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == meta["files"]
    assert "checkpoints" in meta["files"] and {*TRAINED, "recipe.yaml", "train_results.json"} <= set(meta["files"])


def test_best_metric_keeps_the_best_logged_recall(pairs, tmp_path, monkeypatch):
    """The evaluation's recall is scripted (step 2 best by t2i_r@1), so the best is not the last checkpoint."""
    from vlmtune.contrastive import trainer as trainer_module

    scripted = iter([0.25, 0.75, 0.5])
    real = trainer_module.pair_recall

    def recall(*args, **kwargs):
        return {**real(*args, **kwargs), "t2i_r@1": next(scripted)}

    monkeypatch.setattr(trainer_module, "pair_recall", recall)
    recipe = _recipe(pairs, tmp_path / "run", max_steps=6, save_steps=2, eval_steps=2, save_total_limit=1,
                     best_metric="t2i_r@1")
    out, results = _train(recipe)
    best = {"step": 4, "metric": "eval_t2i_r@1", "value": 0.75, "checkpoint": "checkpoints/checkpoint-4"}
    assert results["best_checkpoint"] == best
    assert json.loads((out / "vlmtune.json").read_text())["best_checkpoint"] == best
    assert [h["t2i_r@1"] for h in results["recall_history"]] == [0.25, 0.75, 0.5]
    assert results["recall"]["t2i_r@1"] == 0.75  # the recall of the weights written
    # save_total_limit 1 keeps the best checkpoint; the final folder holds its weights, not the last step's
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    _assert_same_weights(_weights(out), _weights(out / "checkpoints" / "checkpoint-4"), rtol=0, atol=0)
    kept = load_file(out / "adapter_model.safetensors")
    monkeypatch.undo()
    assert any(not torch.equal(kept[k], v) for k, v in _last_step_weights(pairs, tmp_path).items())


def _last_step_weights(pairs, tmp_path):
    """The adapter of the same run without best_metric: the step-6 weights (they differ from step 4's)."""
    out, _ = _train(_recipe(pairs, tmp_path / "last", max_steps=6, save_steps=100, eval_steps=None))
    return load_file(out / "adapter_model.safetensors")


def test_best_metric_names_are_checked_against_what_the_evaluation_logs(pairs, tmp_path):
    assert _recipe(pairs, tmp_path / "a", best_metric="eval_i2t_r@5").train.best_metric == "eval_i2t_r@5"
    with pytest.raises(RecipeError) as e:
        _recipe(pairs, tmp_path / "b", best_metric="recall@1")
    message = str(e.value)
    assert "train.best_metric: 'recall@1' is not logged at evaluation" in message
    assert "eval_i2t_r@1, eval_t2i_r@1, eval_i2t_r@5, eval_t2i_r@5, eval_i2t_r@10, eval_t2i_r@10" in message
    assert "eval_loss" not in message and "train.eval_metrics" not in message


def test_resume_best_metric_and_deepspeed_are_accepted_and_4bit_with_deepspeed_is_refused(pairs, tmp_path):
    recipe = _recipe(pairs, tmp_path / "a", resume_from_checkpoint="latest", best_metric="i2t_r@1")
    assert recipe.train.resume_from_checkpoint == "latest" and recipe.train.best_metric == "i2t_r@1"
    for stage in ("zero2", "zero3"):
        assert load_recipe(None, {**recipe.to_dict(), "distributed": {"deepspeed": stage}}).distributed.deepspeed \
            == stage
    with pytest.raises(RecipeError, match="quantization.mode: 4bit with DeepSpeed is not supported for method "
                                          "contrastive"):
        load_recipe(None, {**recipe.to_dict(), "distributed": {"deepspeed": "zero2"},
                           "quantization": {"mode": "4bit"}})
