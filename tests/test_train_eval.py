"""During training: generation metrics logged beside eval_loss, train.best_metric keeping the best checkpoint's
adapter (and saying which step), TensorBoard logs by default, training_curves.png with one curve per logged series,
and the recipe errors of these fields."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmtune
from vlmtune import curves, eval_during_training, reporting
from vlmtune.config import RecipeError
from vlmtune.run_folder import run_state

from .run_fixtures import SHAPES, recipe_at, write_train_data

SCRIPTED = [0.2, 0.9, 0.5, 0.1]  # eval_exact_match at steps 2, 4, 6, 8: the best is step 4, not the last


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 steps, an evaluation and a checkpoint every 2, real generation metrics on 4 eval rows, with the exact
    match replaced by a script (so the best step is known) and save_total_limit 2 (the best must survive it)."""
    folder = tmp_path_factory.mktemp("train-eval")
    data = write_train_data(folder)
    eval_file = folder / "eval.jsonl"
    eval_file.write_text("\n".join((SHAPES / "eval.jsonl").read_text().splitlines()[:8]) + "\n")
    recipe = recipe_at(folder / "out", data, **{
        "data.eval": str(eval_file), "train.max_steps": 8, "train.eval_steps": 2, "train.save_steps": 2,
        "train.eval_metrics": ["exact_match", "token_f1"], "train.eval_generate_samples": 4,
        "train.eval_max_new_tokens": 8, "train.per_device_eval_batch_size": 4, "train.learning_rate": 2e-2,
        "train.best_metric": "eval_exact_match", "train.save_total_limit": 2, "train.cache_vision_features": False})
    real_scores, real_replies = eval_during_training.generation_scores, eval_during_training.replies
    calls = []

    def replies(loaded, rows, **kwargs):  # how the model generates
        calls.append([len(rows), loaded.model.training, torch.is_grad_enabled(), kwargs["batch_size"]])
        return real_replies(loaded, rows, **kwargs)

    def scripted(g, model):
        scores = real_scores(g, model)
        calls[-1].append(dict(scores))
        return {**scores, "exact_match": SCRIPTED[len(calls) - 1]}

    mp = pytest.MonkeyPatch()
    mp.setattr(eval_during_training, "generation_scores", scripted)
    mp.setattr(eval_during_training, "replies", replies)
    logs = []
    try:
        result = vlmtune.train(recipe, log=lambda *a: logs.append(" ".join(map(str, a))))
    finally:
        mp.undo()
    return result, calls, logs


def test_generation_metrics_are_logged_beside_eval_loss_at_each_evaluation(run):
    result, calls, _ = run
    history = json.loads((result.output_dir / curves.LOG_HISTORY).read_text())
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6, 8]
    assert [h["eval_exact_match"] for h in evals] == SCRIPTED
    assert all(0.0 <= h["eval_token_f1"] <= 1.0 for h in evals)
    # the real scoring ran once per evaluation, on the first 4 rows in one batch, in eval mode without gradients
    assert [c[:4] for c in calls] == [[4, False, False, 4]] * 4
    assert [c[4]["token_f1"] for c in calls] == [h["eval_token_f1"] for h in evals]


def test_the_final_adapter_is_the_best_checkpoints_and_the_folder_names_its_step(run):
    result, _, logs = run
    out = result.output_dir
    best = {"step": 4, "metric": "eval_exact_match", "value": 0.9, "checkpoint": "checkpoints/checkpoint-4"}
    assert json.loads((out / "train_results.json").read_text())["best_checkpoint"] == best
    assert json.loads((out / "vlmtune.json").read_text())["best_checkpoint"] == best
    assert "best checkpoint: step 4 (eval_exact_match 0.9); the adapter written is that checkpoint's" in logs
    # save_total_limit 2 keeps the newest and the best; the trainer state names the published folder
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-4" and ".saving" not in state["best_model_checkpoint"]
    final = load_file(out / "adapter_model.safetensors")
    kept, last = (load_file(out / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (4, 8))
    assert final.keys() == kept.keys()
    assert all(torch.equal(final[k], kept[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)
    # train_results' eval figures are those of the weights written
    assert json.loads((out / "train_results.json").read_text())["eval_exact_match"] == 0.9


def test_training_curves_png_has_one_curve_per_logged_series(run):
    result, _, _ = run
    out = result.output_dir
    png = out / curves.CURVES
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {curves.CURVES, curves.LOG_HISTORY} <= set(json.loads((out / "vlmtune.json").read_text())["files"])
    fig = vlmtune.training_curves(out)
    labels = [line.get_label() for ax in fig.axes if ax.get_visible() for line in ax.get_lines()]
    assert len(labels) == len(set(labels))
    history = json.loads((out / curves.LOG_HISTORY).read_text())
    assert set(labels) == set(curves.series(history))
    assert {"loss", "eval_loss", "learning_rate", "grad_norm", "eval_exact_match", "eval_token_f1"} <= set(labels)
    assert not any(re.search(r"runtime|per_second|^epoch$|^train_", label) for label in labels)
    # each line holds its series' points; train and eval loss share the loss panel
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["eval_exact_match"].get_ydata()) == SCRIPTED
    loss_panel = next(ax for ax in fig.axes if ax.get_title() == "loss")
    assert sorted(line.get_label() for line in loss_panel.get_lines()) == ["eval_loss", "loss"]
    # a checkpoint's trainer_state.json draws too (a run still in progress)
    part = vlmtune.training_curves(out / "checkpoints" / "checkpoint-4")
    assert max(max(line.get_xdata()) for ax in part.axes for line in ax.get_lines()) == 4


def test_tensorboard_logs_by_default_under_the_run_folder(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, _ = run
    assert vlmtune.Recipe().train.report_to == ["tensorboard"]  # installed: a dependency
    events = list((result.output_dir / reporting.LOGS).glob("*/events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "eval/exact_match", "eval/token_f1"} <= tags
    assert [e.value for e in acc.Scalars("eval/exact_match")] == pytest.approx(SCRIPTED)
    assert not (result.output_dir / "checkpoints" / "runs").exists()


def test_without_tensorboard_the_default_is_none(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert reporting.default_report_to() == ["none"]


def test_logs_of_a_start_that_saved_no_checkpoint_leave_a_folder_a_new_run_may_use(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "logs" / "2026-01-01T00-00-00Z").mkdir(parents=True)
    (tmp_path / "logs" / "2026-01-01T00-00-00Z" / "events.out.tfevents.1").write_bytes(b"x")
    assert run_state(tmp_path) == "empty"
    (tmp_path / "checkpoints" / "checkpoint-1").mkdir()
    assert run_state(tmp_path) == "interrupted"


@pytest.mark.parametrize(("fields", "message"), [
    ({"train.eval_metrics": ["exact_match", "bleu5"]},
     "train.eval_metrics: unknown metric 'bleu5'; known metrics: auto, exact_match, vqa_accuracy"),
    ({"train.eval_metrics": ["token_f1"], "data.eval": None},
     "train.eval_metrics: needs data.eval (the rows the replies are scored on)"),
    ({"train.eval_generate_samples": 0}, "train.eval_generate_samples: must be a positive integer, got 0"),
    ({"train.best_metric": "eval_vqa_accuracy", "train.eval_metrics": ["exact_match"], "train.eval_steps": 2,
      "train.save_steps": 2},
     "train.best_metric: 'eval_vqa_accuracy' is not logged at evaluation; the logged ones are eval_loss, "
     "eval_exact_match"),
    ({"train.best_metric": "token_f1", "train.eval_steps": 2, "train.save_steps": 2},
     "the logged ones are eval_loss (add the metric to train.eval_metrics to log it)"),
    ({"train.best_metric": "eval_pope_yes_ratio", "train.eval_metrics": ["pope"], "train.eval_steps": 2,
      "train.save_steps": 2}, "train.best_metric: eval_pope_yes_ratio is not better when higher or lower"),
    ({"train.best_metric": "eval_loss"}, "train.best_metric: needs train.eval_steps (the best checkpoint is chosen "
                                         "among the evaluated ones): set train.eval_steps, and train.save_steps (1)"),
    ({"train.best_metric": "eval_loss", "train.eval_steps": 4, "train.save_steps": 6},
     "train.save_steps: must be a multiple of train.eval_steps with train.best_metric (only a checkpoint saved at "
     "an evaluated step can be the best), got save_steps 6 and eval_steps 4; e.g. save_steps: 4"),
])
def test_eval_fields_are_checked_with_the_recipe(tmp_path, fields, message):
    data = write_train_data(tmp_path)
    with pytest.raises(RecipeError) as e:
        recipe_at(tmp_path / "out", data, **{"data.eval": str(data), **fields})
    assert message in str(e.value)


def test_a_good_best_metric_recipe_loads(tmp_path):
    data = write_train_data(tmp_path)
    recipe = recipe_at(tmp_path / "out", data, **{"data.eval": str(data), "train.eval_metrics": ["auto"],
                                                  "train.best_metric": "token_f1", "train.eval_steps": 2,
                                                  "train.save_steps": 4})
    from vlmtune.best_checkpoint import trainer_args

    assert trainer_args(recipe.train) == {"load_best_model_at_end": True, "metric_for_best_model": "eval_token_f1",
                                          "greater_is_better": True}
    loss = recipe_at(tmp_path / "out", data, **{"data.eval": str(data), "train.best_metric": "loss",
                                                "train.eval_steps": 2, "train.save_steps": 2})
    assert trainer_args(loss.train)["greater_is_better"] is False


def test_references_a_metric_cannot_score_are_refused_before_training(tmp_path):
    from vlmtune.preflight import plan_run

    data = write_train_data(tmp_path)  # sentences, not the yes/no answers POPE scores
    recipe = recipe_at(tmp_path / "out", data, **{"data.eval": str(data), "train.eval_metrics": ["pope"],
                                                  "train.eval_generate_samples": 2})
    with pytest.raises(vlmtune.VlmtuneError, match=r"(?s)train.eval_metrics: the references do not fit the metrics \(choose others in train.eval_metrics\)"
                                                   r".*metric pope cannot score 2 "
                                                   r"reference\(s\).*train.jsonl:1"):
        eval_during_training.setup(plan_run(recipe))


def test_the_best_checkpoint_is_recorded_by_its_published_path(tmp_path):
    """The Trainer, saving under checkpoints/.saving/, would record the staged path (gone once published)."""
    from types import SimpleNamespace

    from vlmtune.best_checkpoint import published

    run_dir = tmp_path / "checkpoints"
    (run_dir / "checkpoint-2").mkdir(parents=True)
    state = SimpleNamespace(best_global_step=4, best_model_checkpoint=str(run_dir / ".saving" / "checkpoint-4"))
    assert published(state, run_dir, run_dir / "checkpoint-4")  # being published now
    assert state.best_model_checkpoint == str(run_dir / "checkpoint-4")
    (run_dir / "checkpoint-4").mkdir()  # published
    assert not published(state, run_dir, run_dir / "checkpoint-6")  # an earlier best: unchanged
    assert state.best_model_checkpoint == str(run_dir / "checkpoint-4")
    state.best_global_step = 5  # evaluated at a step that saved nothing: the earlier saved best stays
    assert not published(state, run_dir, run_dir / "checkpoint-6")
    assert state.best_model_checkpoint == str(run_dir / "checkpoint-4")
    state.best_global_step, state.best_model_checkpoint = 2, "/elsewhere/checkpoint-2"  # a moved run (--overwrite)
    assert published(state, run_dir, run_dir / "checkpoint-6")
    assert state.best_model_checkpoint == str(run_dir / "checkpoint-2")


def test_a_resumed_run_keeps_the_best_checkpoint_of_its_earlier_steps(run, tmp_path, monkeypatch):
    """Continued to step 12 from a copy of the finished run (its recorded best path is the original's), with worse
    scores at 10 and 12: the adapter written is still checkpoint-4's, and the copy's own checkpoint-4 is named."""
    from .run_fixtures import copy_run

    result, _, _ = run
    out = copy_run(result.output_dir, tmp_path)
    later = iter([0.3, 0.4])
    monkeypatch.setattr(eval_during_training, "generation_scores",
                        lambda g, model: {"exact_match": next(later), "token_f1": 0.0})
    again = vlmtune.load_recipe(out / "recipe.yaml", overrides={  # the resolved recipe the run saved
        "output_dir": str(out), "train.max_steps": 12, "train.resume_from_checkpoint": "latest"})
    vlmtune.train(again, log=lambda *a: None)
    assert json.loads((out / "train_results.json").read_text())["best_checkpoint"]["step"] == 4
    final = load_file(out / "adapter_model.safetensors")
    kept = load_file(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in final)
    state = json.loads((out / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(out / "checkpoints" / "checkpoint-4")
    assert len(list((out / reporting.LOGS).iterdir())) == 2  # each start logs apart

