"""Nothing a run made is replaced unasked: a second run, or a resume of a finished run or by another recipe,
is refused; --overwrite replaces a run whole; a folder that cannot hold a run, and a report_to that cannot
report, are refused before any work."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune import cli, preflight, training

from .run_fixtures import (
    ROOT,
    can_mount_tmpfs,
    copy_run,
    quiet,
    recipe_at,
    recipe_file,
    snapshot,
    write_train_data,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished run: adapter, vlmtune.json, checkpoints 1 and 2 (tests change copies of it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    vlmtune.train(recipe_at(out, data), log=quiet)
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if training gets as far as reading data or loading the model."""
    def planned(*args, **kwargs):
        raise AssertionError("the run got past the output-folder checks")

    monkeypatch.setattr(training, "plan_run", planned)


def test_a_second_run_into_a_finished_run_is_refused_and_changes_nothing(finished, data, tmp_path, no_work):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    logs = []
    with pytest.raises(vlmtune.VlmtuneError) as e:
        vlmtune.train(recipe_at(out, data), log=logs.append)
    message = str(e.value)
    assert f"output_dir {out} already holds a finished run" in message and "2 steps" in message
    assert "--overwrite" in message and "another output_dir" in message
    assert "train.resume_from_checkpoint=latest" in message
    assert snapshot(out) == before
    assert logs == [f"output folder: {out}"]  # printed first, before anything else


def test_an_interrupted_run_is_refused_without_resume(finished, data, tmp_path, no_work):
    out = copy_run(finished, tmp_path)
    (out / "vlmtune.json").unlink()  # as a run killed before its final write leaves it
    with pytest.raises(vlmtune.VlmtuneError) as e:
        vlmtune.train(recipe_at(out, data), log=quiet)
    message = str(e.value)
    assert "holds a run that did not finish (checkpoints checkpoint-1, checkpoint-2; no vlmtune.json)" in message
    assert "train.resume_from_checkpoint=latest" in message and "--overwrite" in message
    shutil.rmtree(out / "checkpoints")  # killed before its first checkpoint: nothing to resume
    with pytest.raises(vlmtune.VlmtuneError, match="did not finish and saved no checkpoint .* --overwrite"):
        vlmtune.train(recipe_at(out, data), log=quiet)


def test_overwrite_keeps_the_old_run_whole_until_the_new_one_is_complete(finished, data, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    new = recipe_at(out, data, **{"train.max_steps": 1, "train.save_steps": 1000, "train.learning_rate": 5e-2})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(training, "dump", interrupted)  # Ctrl-C in the new run's final write
        with pytest.raises(KeyboardInterrupt):
            vlmtune.train(new, log=quiet, overwrite=True)
    assert snapshot(out) == before  # the old run, untouched

    logs = []
    result = vlmtune.train(new, log=logs.append, overwrite=True)
    assert result.output_dir == out
    assert any("removed" in line and "unfinished replacement" in line for line in logs)
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 1
    assert (out / "vlmtune.json").is_file()
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert not (out / "checkpoints" / "checkpoint-2").exists()  # nothing of the old run is left
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # no staging or old folder beside it


def test_overwrite_never_deletes_files_the_run_did_not_write(finished, data, tmp_path):
    out = copy_run(finished, tmp_path)
    assert "adapter_model.safetensors" in json.loads((out / "vlmtune.json").read_text())["files"]
    (out / "eval-preds.jsonl").write_text('{"prediction": "mine"}\n')  # e.g. `predict --out` into the run
    before = snapshot(out)
    new = recipe_at(out, data, **{"train.max_steps": 1, "train.save_steps": 1000})
    with pytest.raises(vlmtune.VlmtuneError, match=r"files its run did not write \(eval-preds.jsonl\)"):
        vlmtune.train(new, log=quiet, overwrite=True)
    assert snapshot(out) == before


def test_overwrite_refuses_when_the_runs_file_list_cannot_be_read(finished, data, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "vlmtune.json").write_text('{"files": ["adapter_model.safetensors"')  # cut short
    before = snapshot(out)
    new = recipe_at(out, data, **{"train.max_steps": 1, "train.save_steps": 1000})
    with pytest.raises(vlmtune.VlmtuneError, match="cannot tell the run's files"):
        vlmtune.train(new, log=quiet, overwrite=True)
    assert snapshot(out) == before


def test_sft_refuses_a_finished_run_and_passes_overwrite_on(data, tmp_path, monkeypatch, capsys, no_work):
    out = tmp_path / "run"
    out.mkdir()
    (out / "vlmtune.json").write_text("{}")
    recipe = recipe_file(tmp_path, data)
    assert cli.main(["sft", str(recipe), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err and "Traceback" not in err

    seen = {}

    def fake_train(recipe, log=print, overwrite=False):
        seen["overwrite"] = overwrite
        raise vlmtune.VlmtuneError("stop here")

    monkeypatch.setattr(training, "train", fake_train)
    assert cli.main(["sft", str(recipe), f"output_dir={out}", "--overwrite"]) == 2
    assert seen == {"overwrite": True}


def test_resuming_a_finished_run_is_refused_and_changes_nothing(finished, data, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    with pytest.raises(vlmtune.VlmtuneError) as e:
        vlmtune.train(recipe_at(out, data, **{"train.resume_from_checkpoint": "latest"}), log=quiet)
    assert f"{out / 'checkpoints' / 'checkpoint-2'} is at step 2 and this recipe trains 2 steps" in str(e.value)
    assert "raise train.max_steps" in str(e.value)
    assert snapshot(out) == before


def test_resuming_with_a_recipe_that_changes_the_training_is_refused_naming_each_difference(finished, data, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    changed = {"train.resume_from_checkpoint": "latest", "train.learning_rate": 1e-3, "lora.r": 8,
               "train.max_steps": 4, "train.logging_steps": 5}  # the last two may change
    with pytest.raises(vlmtune.VlmtuneError) as e:
        vlmtune.train(recipe_at(out, data, **changed), log=quiet)
    message = str(e.value)
    assert "was made by another run" in message
    assert "  - train.learning_rate: 0.01 -> 0.001" in message and "  - lora.r: 16 -> 8" in message
    assert "max_steps" not in message and "logging_steps" not in message
    assert snapshot(out) == before


def _file(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return "a-file", "is a file, not a folder", {}


def _under_a_file(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return "a-file/out", "a-file is a file", {}


def _someone_elses_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    return "notes", "is not empty and holds no vlmtune run (todo.txt)", {"overwrite": True}


def _inside_the_base_model(tmp_path):
    from vlmtune.demo import builtin_model_path

    base = builtin_model_path("tiny-qwen2-vl")
    return str(base / "out"), f"lies inside the base model folder {base.resolve()}", {"model.name_or_path": str(base)}


def _around_the_base_model(tmp_path):
    from vlmtune.demo import builtin_model_path

    base = builtin_model_path("tiny-qwen2-vl")
    return str(base.parent), f"contains the base model folder {base.resolve()}", {"model.name_or_path": str(base)}


def _read_only(tmp_path, monkeypatch):
    from vlmtune import run_folder

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run_folder.tempfile, "mkstemp", refuse)
    return "out", "cannot write in", {}


@pytest.mark.parametrize("case", [_file, _under_a_file, _someone_elses_folder, _inside_the_base_model,
                                  _around_the_base_model, _read_only])
def test_a_folder_that_cannot_hold_a_run_is_refused_before_any_work(case, data, tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)  # output_dir is relative: the resolved folder is printed
    args = (tmp_path, monkeypatch) if case is _read_only else (tmp_path,)
    output_dir, expected, extra = case(*args)
    overwrite = extra.pop("overwrite", False)
    before = snapshot(tmp_path)
    logs = []
    with pytest.raises(vlmtune.VlmtuneError, match="output_dir") as e:
        vlmtune.train(recipe_at(output_dir, data, **extra), log=logs.append, overwrite=overwrite)
    assert expected in str(e.value)
    assert logs == [f"output folder: {tmp_path / output_dir}"]
    assert snapshot(tmp_path) == before


def test_a_read_only_mount_is_refused_before_any_work(data, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if not can_mount_tmpfs(mount):
        pytest.skip("no private mounts here (unshare -rm): the patched case above covers the message")
    recipe = recipe_file(tmp_path, data)
    command = [sys.executable, "-m", "vlmtune.cli", "sft", str(recipe), f"output_dir={mount / 'out'}"]
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"',
                           str(mount), *command], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"output_dir {mount / 'out'}: cannot write in {mount} (Read-only file system)" in proc.stderr
    assert "Traceback" not in proc.stderr and "train data:" not in proc.stdout


def test_report_to_an_integration_that_is_not_installed_is_refused_before_training(data, tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])

    def built(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(training, "build_trainer", built)
    recipe = recipe_at(tmp_path / "out", data, **{"train.report_to": ["wandb", "wandbb"]})
    with pytest.raises(vlmtune.PreflightError) as e:
        vlmtune.train(recipe, log=quiet)
    assert "train.report_to: wandb is not installed: pip install wandb, or set train.report_to: none" in str(e.value)
    assert "train.report_to: unknown integration 'wandbb'; known: none, all, " in str(e.value)
    assert preflight.reporting_errors(recipe_at(tmp_path / "out", data, **{"train.report_to": ["none"]})) == []


def test_a_run_that_failed_after_its_last_checkpoint_is_finished_by_resuming(finished, data, tmp_path):
    """The Trainer saves a checkpoint at the last step; a failure after it (final eval, a full disk in the final
    write) leaves no vlmtune.json. Resuming trains nothing and writes the outputs from that checkpoint."""
    from safetensors.torch import load_file

    out = copy_run(finished, tmp_path)
    for name in json.loads((out / "vlmtune.json").read_text())["files"] + ["vlmtune.json"]:
        (out / name).unlink()  # as a final write that failed on a full disk left it
    last = out / "checkpoints" / "checkpoint-2"
    with pytest.raises(vlmtune.VlmtuneError, match="Continue it with train.resume_from_checkpoint=latest"):
        vlmtune.train(recipe_at(out, data), log=quiet)
    logs = []
    result = vlmtune.train(recipe_at(out, data, **{"train.resume_from_checkpoint": "latest"}), log=logs.append)
    assert f"{last} is at the last step: nothing was left to train; the run's outputs are written from it" in logs
    assert (out / "vlmtune.json").is_file() and result.metrics["global_step"] == 2
    saved, trained = load_file(out / "adapter_model.safetensors"), load_file(last / "adapter_model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    losses = [h["loss"] for h in json.loads((last / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_loss"] == pytest.approx(sum(losses) / 2) and results["outputs_from_checkpoint"] == str(last)


def test_a_crash_before_the_first_checkpoint_leaves_a_folder_a_new_run_may_use(data, tmp_path, monkeypatch):
    from vlmtune import checkpoints, run_folder

    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as m:
        m.setattr(checkpoints.AtomicCheckpoints, "_init_training_state", crash)  # before the first step
        with pytest.raises(RuntimeError, match="out of memory"):
            vlmtune.train(recipe_at(out, data), log=quiet)
    assert [p.name for p in out.iterdir()] == ["checkpoints"] and not any((out / "checkpoints").iterdir())
    (out / ".DS_Store").write_text("")
    assert run_folder.run_state(out) == "empty"
    monkeypatch.setattr(training, "plan_run", lambda recipe: (_ for _ in ()).throw(AssertionError("past the checks")))
    with pytest.raises(AssertionError, match="past the checks"):
        vlmtune.train(recipe_at(out, data), log=quiet)


def test_overwrite_after_a_kill_during_the_final_write_replaces_the_runs_own_files(data, tmp_path, monkeypatch):
    from vlmtune.run_folder import STAGING_PREFIX

    out = tmp_path / "run"
    recipe = recipe_at(out, data, **{"train.max_steps": 1, "train.save_steps": 1000})
    original, moved = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(src).parent.name.startswith(STAGING_PREFIX) and Path(dst).parent == out:
            if len(moved) == 2:
                raise KeyboardInterrupt  # a kill in the middle of the moves
            moved.append(Path(dst).name)
        original(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            vlmtune.train(recipe, log=quiet)
    assert all((out / name).exists() for name in moved) and not (out / "vlmtune.json").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(vlmtune.VlmtuneError, match=r"files its run did not write \(notes.txt\)"):
        vlmtune.train(recipe, log=quiet, overwrite=True)
    (out / "notes.txt").unlink()
    vlmtune.train(recipe, log=quiet, overwrite=True)
    assert (out / "vlmtune.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
